//! `Direct` against a real file on the build's disk (`O_DIRECT` needs a filesystem that takes
//! it; the target directory is on one wherever the workspace builds).

use std::os::unix::fs::FileExt;

use directio::{is_aligned, is_memory_aligned, AlignedBuf, Direct, DIRECT_ALIGN};

fn file_of(len: u64) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    file.as_file().set_len(len).unwrap();
    file
}

#[test]
fn aligned_writes_and_reads_agree_with_the_buffered_descriptor() {
    let file = file_of(1 << 20);
    let direct = Direct::open(file.path(), true).unwrap();
    let data: Vec<u8> = (0..65536u32).map(|i| (i * 7 % 251) as u8).collect();
    direct.write_at(&data, 8192).unwrap();
    let mut seen = vec![0u8; data.len()];
    file.as_file().read_exact_at(&mut seen, 8192).unwrap();
    assert_eq!(seen, data, "the buffered descriptor sees the direct write");

    // A buffered write still in the page cache is what a direct read returns.
    file.as_file().write_all_at(&[0xAB; 100], 8192 + 10).unwrap();
    let mut back = vec![0u8; 4096];
    direct.read_at(&mut back, 8192).unwrap();
    assert_eq!(back.get(10..110), Some(&[0xAB; 100][..]));
    assert_eq!(back.get(..10), data.get(..10));

    let mut past = vec![0u8; 4096];
    let err = direct.read_at(&mut past, 1 << 20).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
}

#[test]
fn bounce_buffers_are_aligned_and_reused() {
    let file = file_of(1 << 20);
    let direct = Direct::open(file.path(), false).unwrap();
    let first = direct.take(65536);
    let at = first.as_slice().as_ptr() as usize;
    assert_eq!(at % DIRECT_ALIGN, 0);
    assert_eq!(first.as_slice().len(), 65536);
    direct.give_back(first);
    let again = direct.take(4096);
    assert_eq!(again.as_slice().as_ptr() as usize, at, "a spare buffer large enough is reused");
    assert_eq!(again.as_slice().len(), 4096);
    assert!(is_aligned(8192, 4096) && !is_aligned(8192, 100) && !is_aligned(100, 4096) && !is_aligned(0, 0));
}

#[test]
fn aligned_memory_goes_in_place_and_any_other_memory_through_the_bounce_buffer() {
    let file = file_of(1 << 20);
    let direct = Direct::open(file.path(), true).unwrap();
    let mut aligned = AlignedBuf::new(16384);
    assert!(is_memory_aligned(&aligned) && aligned.len() == 16384);
    for (i, b) in aligned.iter_mut().enumerate() {
        *b = (i % 239) as u8;
    }
    direct.write_at(&aligned, 4096).unwrap();

    // The same bytes one address later: never aligned, so they take the bounce buffer.
    let mut shifted = vec![0u8; 16384 + 1];
    shifted[1..].copy_from_slice(&aligned);
    assert!(!is_memory_aligned(&shifted[1..]));
    direct.write_at(&shifted[1..], 65536).unwrap();

    let mut seen = vec![0u8; 16384];
    for at in [4096, 65536] {
        file.as_file().read_exact_at(&mut seen, at).unwrap();
        assert_eq!(seen[..], aligned[..], "data at {at}");
    }
    let mut back = AlignedBuf::new(16384);
    direct.read_at(&mut back, 65536).unwrap();
    assert_eq!(back[..], aligned[..]);
    let mut back_shifted = vec![0u8; 16384 + 1];
    direct.read_at(&mut back_shifted[1..], 4096).unwrap();
    assert_eq!(back_shifted[1..], aligned[..]);

    assert!(aligned.set_len(4096) && aligned.len() == 4096);
    assert!(!aligned.set_len(aligned.capacity() + 1), "a buffer never grows past its allocation");
    assert!(AlignedBuf::default().is_empty());
}

#[test]
fn a_pool_hands_out_aligned_buffers_reuses_them_and_keeps_within_its_bound() {
    let pool = directio::AlignedPool::new(1 << 20);
    let a = pool.take(4096);
    let ptr = a.as_ptr();
    assert!(is_memory_aligned(&a), "buffers start on a page boundary");
    pool.put(a);
    let b = pool.take(1024);
    assert_eq!(b.as_ptr(), ptr, "the freed buffer was reused");
    assert_eq!(b.len(), 1024);
    let c = pool.take(8192);
    assert!(is_memory_aligned(&c) && c.len() == 8192, "a larger request gets a new buffer");
    pool.put(AlignedBuf::new(2 << 20));
    assert_eq!(pool.held(), 0, "a buffer over the bound is dropped");
}
