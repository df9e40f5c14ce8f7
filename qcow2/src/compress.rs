//! Decompressing compressed clusters (raw deflate, as qemu writes with zlib window bits -12, or
//! zstd). Both stop at one cluster of output: the compressed bytes may be followed by the start
//! of the next compressed cluster in the same sector.

use crate::error::{Error, Result};
use crate::header::Compression;

/// Decompress `input` into exactly `out.len()` bytes.
///
/// # Errors
/// [`Error::CorruptCompressedCluster`] if the stream is invalid or ends early.
pub fn decompress(kind: Compression, input: &[u8], out: &mut [u8], host: u64) -> Result<()> {
    let corrupt = |reason: String| Error::CorruptCompressedCluster { offset: host, reason };
    match kind {
        Compression::Zlib => {
            let mut d = flate2::Decompress::new(false);
            let status =
                d.decompress(input, out, flate2::FlushDecompress::Finish).map_err(|e| corrupt(e.to_string()))?;
            if (d.total_out() as usize) < out.len() {
                return Err(corrupt(format!("deflate stream ended after {} bytes ({status:?})", d.total_out())));
            }
            Ok(())
        }
        Compression::Zstd => {
            use zstd::stream::raw::{Decoder, Operation};
            let mut d = Decoder::new().map_err(|e| corrupt(e.to_string()))?;
            let mut inp = zstd::stream::raw::InBuffer::around(input);
            let mut outp = zstd::stream::raw::OutBuffer::around(out);
            while outp.pos() < outp.capacity() {
                let before = (inp.pos(), outp.pos());
                d.run(&mut inp, &mut outp).map_err(|e| corrupt(e.to_string()))?;
                if (inp.pos(), outp.pos()) == before {
                    return Err(corrupt(format!("zstd stream ended after {} bytes", outp.pos())));
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn raw_deflate_with_trailing_bytes_decompresses_to_one_cluster() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 7) as u8).collect();
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&data).unwrap();
        let mut compressed = enc.finish().unwrap();
        compressed.extend_from_slice(&[0xff; 300]);
        let mut out = vec![0u8; 65536];
        decompress(Compression::Zlib, &compressed, &mut out, 0).unwrap();
        assert_eq!(out, data);
        let mut short = vec![0u8; 65536];
        assert!(decompress(Compression::Zlib, &compressed[..20], &mut short, 0).is_err());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut out = vec![0u8; 4096];
        assert!(decompress(Compression::Zlib, &[0xff; 64], &mut out, 0x1000).is_err());
        assert!(decompress(Compression::Zstd, &[0xff; 64], &mut out, 0x1000).is_err());
        assert!(decompress(Compression::Zstd, &[], &mut out, 0x1000).is_err());
    }
}
