//! The qcow2 header and its extensions (qemu `docs/interop/qcow2.txt`, "Header").
//!
//! [`Header::parse`] takes the bytes of the first cluster and checks every field before anything
//! is sized from it: cluster size 512 B..2 MiB, L1 and refcount tables within qemu's limits and
//! cluster-aligned, the backing name and every extension inside the header cluster, known
//! incompatible bits only. Extensions it does not interpret are kept byte for byte, so an image
//! this crate rewrites keeps what it did not understand. Pure: no I/O.

use crate::error::{Error, Result};

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Smallest cluster_bits qemu accepts.
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster_bits qemu accepts.
pub const MAX_CLUSTER_BITS: u32 = 21;
/// qemu's limit on the L1 table (32 MiB).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// qemu's limit on the refcount table (8 MiB).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Longest backing file name qemu writes.
pub const MAX_BACKING_NAME: u32 = 1023;
/// Largest virtual size accepted (qemu's limit: 2^63 - 512 bytes, kept lower to avoid overflow
/// in offset arithmetic).
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 61;
/// Length of the v3 header we write.
pub const V3_HEADER_LEN: u32 = 112;

/// Header extension types.
pub mod ext {
    /// End of the extension area.
    pub const END: u32 = 0;
    /// Backing file format name.
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    /// Feature name table.
    pub const FEATURE_TABLE: u32 = 0x6803_f857;
    /// Persistent bitmaps.
    pub const BITMAPS: u32 = 0x2385_2875;
    /// Full disk encryption.
    pub const ENCRYPTION: u32 = 0x0537_be77;
    /// External data file name.
    pub const EXTERNAL_DATA_FILE: u32 = 0x4441_5441;
}

/// Incompatible feature bits.
pub mod incompatible {
    /// Refcounts may be inconsistent (lazy refcounts in use and not flushed).
    pub const DIRTY: u64 = 1 << 0;
    /// The image is known to be corrupt: no writes.
    pub const CORRUPT: u64 = 1 << 1;
    /// Data lives in an external file.
    pub const EXTERNAL_DATA: u64 = 1 << 2;
    /// The compression type field is used.
    pub const COMPRESSION_TYPE: u64 = 1 << 3;
    /// L2 entries are 128 bits with subcluster bitmaps.
    pub const EXTENDED_L2: u64 = 1 << 4;
    /// Every bit this crate understands.
    pub const KNOWN: u64 = DIRTY | CORRUPT | EXTERNAL_DATA | COMPRESSION_TYPE | EXTENDED_L2;
}

/// Compatible feature bits.
pub mod compatible {
    /// Lazy refcounts.
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Compression of compressed clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate (the default).
    Zlib,
    /// Zstandard.
    Zstd,
}

/// One header extension kept as bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    /// Type (`ext::*`).
    pub kind: u32,
    /// Data, without padding.
    pub data: Vec<u8>,
}

/// A parsed, validated header.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name (0 = none).
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Entries in the L1 table.
    pub l1_size: u32,
    /// Offset of the L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits (0..=6).
    pub refcount_order: u32,
    /// Bytes of the fixed header.
    pub header_length: u32,
    /// Compression type.
    pub compression: Compression,
    /// Backing file name as stored.
    pub backing_file: Option<String>,
    /// Header extensions in file order (backing format and feature table included).
    pub extensions: Vec<Extension>,
}

fn invalid(field: &'static str, value: u64, reason: &'static str) -> Error {
    Error::InvalidHeader { field, value, reason }
}

fn be32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4).and_then(|s| s.try_into().ok()).map(u32::from_be_bytes).unwrap_or(0)
}

fn be64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8).and_then(|s| s.try_into().ok()).map(u64::from_be_bytes).unwrap_or(0)
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Whether L2 entries are 128-bit with subcluster bitmaps.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & incompatible::EXTENDED_L2 != 0
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// The backing format named by the extension, if any.
    pub fn backing_format(&self) -> Option<String> {
        self.extensions
            .iter()
            .find(|e| e.kind == ext::BACKING_FORMAT)
            .map(|e| String::from_utf8_lossy(&e.data).into_owned())
    }

    /// Bytes of the header needed before `parse` can tell the cluster size.
    pub const PROBE_LEN: usize = 104;

    /// The cluster size announced by the first bytes (to know how much to read), validated.
    ///
    /// # Errors
    /// Not qcow2, or an out-of-range cluster_bits.
    pub fn probe_cluster_size(bytes: &[u8]) -> Result<usize> {
        let magic = be32(bytes, 0);
        if magic != MAGIC {
            return Err(Error::NotQcow2(magic));
        }
        if bytes.len() < 72 {
            return Err(invalid("length", bytes.len() as u64, "file shorter than a qcow2 header"));
        }
        let bits = be32(bytes, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
            return Err(invalid("cluster_bits", u64::from(bits), "must be 9 (512 B) to 21 (2 MiB)"));
        }
        Ok(1usize << bits)
    }

    /// Parse and validate the header from the first cluster of the file (or as much of it as
    /// the file has).
    ///
    /// # Errors
    /// [`Error::InvalidHeader`] naming the field, [`Error::NotQcow2`], [`Error::Unsupported`].
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let cluster = Self::probe_cluster_size(bytes)?;
        let area = bytes.get(..cluster.min(bytes.len())).unwrap_or(bytes);
        let version = be32(area, 4);
        if version != 2 && version != 3 {
            return Err(invalid("version", u64::from(version), "only versions 2 and 3 exist"));
        }
        let cluster_bits = be32(area, 20);
        let cluster_size = 1u64 << cluster_bits;
        let aligned = |v: u64| v & (cluster_size - 1) == 0;
        let mut h = Header {
            version,
            backing_file_offset: be64(area, 8),
            backing_file_size: be32(area, 16),
            cluster_bits,
            size: be64(area, 24),
            l1_size: be32(area, 36),
            l1_table_offset: be64(area, 40),
            refcount_table_offset: be64(area, 48),
            refcount_table_clusters: be32(area, 56),
            nb_snapshots: be32(area, 60),
            snapshots_offset: be64(area, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: 72,
            compression: Compression::Zlib,
            backing_file: None,
            extensions: Vec::new(),
        };
        let crypt = be32(area, 32);
        if crypt != 0 {
            return Err(Error::Unsupported(format!("encrypted images (crypt_method {crypt})")));
        }
        if version == 3 {
            if area.len() < 104 {
                return Err(invalid("header_length", area.len() as u64, "v3 header truncated"));
            }
            h.incompatible_features = be64(area, 72);
            h.compatible_features = be64(area, 80);
            h.autoclear_features = be64(area, 88);
            h.refcount_order = be32(area, 96);
            h.header_length = be32(area, 100);
            if h.header_length < 104
                || u64::from(h.header_length) > cluster_size
                || h.header_length as usize > area.len()
            {
                return Err(invalid(
                    "header_length",
                    u64::from(h.header_length),
                    "must be 104.. and within the first cluster",
                ));
            }
            if h.header_length > 104 {
                h.compression = match area.get(104).copied().unwrap_or(0) {
                    0 => Compression::Zlib,
                    1 => Compression::Zstd,
                    other => return Err(invalid("compression_type", u64::from(other), "unknown compression type")),
                };
            }
            let unknown = h.incompatible_features & !incompatible::KNOWN;
            if unknown != 0 {
                return Err(Error::Unsupported(format!("unknown incompatible feature bits {unknown:#x}")));
            }
            if h.incompatible_features & incompatible::EXTERNAL_DATA != 0 {
                return Err(Error::Unsupported("external data files".into()));
            }
            if h.compression != Compression::Zlib && h.incompatible_features & incompatible::COMPRESSION_TYPE == 0 {
                return Err(invalid("compression_type", 1, "set without the compression-type incompatible bit"));
            }
            if h.refcount_order > 6 {
                return Err(invalid("refcount_order", u64::from(h.refcount_order), "must be 0..=6 (1 to 64 bits)"));
            }
        }
        if h.size > MAX_VIRTUAL_SIZE {
            return Err(invalid("size", h.size, "larger than 2^61 bytes"));
        }
        let l2_entries = cluster_size / if h.extended_l2() { 16 } else { 8 };
        let l2_coverage = l2_entries * cluster_size;
        let l1_needed = h.size.div_ceil(l2_coverage);
        if u64::from(h.l1_size) < l1_needed {
            return Err(invalid("l1_size", u64::from(h.l1_size), "too small for the virtual size"));
        }
        if u64::from(h.l1_size) * 8 > MAX_L1_BYTES {
            return Err(invalid("l1_size", u64::from(h.l1_size), "L1 table larger than 32 MiB"));
        }
        if h.l1_size > 0 && (h.l1_table_offset == 0 || !aligned(h.l1_table_offset)) {
            return Err(invalid("l1_table_offset", h.l1_table_offset, "not cluster aligned"));
        }
        if h.refcount_table_offset == 0 || !aligned(h.refcount_table_offset) {
            return Err(invalid("refcount_table_offset", h.refcount_table_offset, "not cluster aligned"));
        }
        let reftable_bytes = u64::from(h.refcount_table_clusters) * cluster_size;
        if h.refcount_table_clusters == 0 || reftable_bytes > MAX_REFTABLE_BYTES {
            return Err(invalid(
                "refcount_table_clusters",
                u64::from(h.refcount_table_clusters),
                "must be 1.. and at most 8 MiB",
            ));
        }
        if h.nb_snapshots > 65536 {
            return Err(invalid("nb_snapshots", u64::from(h.nb_snapshots), "more than 65536 snapshots"));
        }
        if h.nb_snapshots > 0 && !aligned(h.snapshots_offset) {
            return Err(invalid("snapshots_offset", h.snapshots_offset, "not cluster aligned"));
        }
        h.extensions = parse_extensions(area, h.header_length as usize)?;
        if h.backing_file_offset != 0 {
            if h.backing_file_size == 0 || h.backing_file_size > MAX_BACKING_NAME {
                return Err(invalid("backing_file_size", u64::from(h.backing_file_size), "must be 1..=1023"));
            }
            let start = usize::try_from(h.backing_file_offset).unwrap_or(usize::MAX);
            let name = start
                .checked_add(h.backing_file_size as usize)
                .and_then(|end| area.get(start..end))
                .ok_or(invalid("backing_file_offset", h.backing_file_offset, "name lies outside the header cluster"))?;
            let name = std::str::from_utf8(name)
                .map_err(|_| invalid("backing_file_offset", h.backing_file_offset, "name is not UTF-8"))?;
            h.backing_file = Some(name.to_string());
        }
        Ok(h)
    }

    /// Encode a v3 header with its extensions and backing name into one cluster's worth of
    /// bytes (the rest zero).
    ///
    /// # Errors
    /// [`Error::InvalidOption`] when the extensions and name do not fit in the first cluster.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let cluster = 1usize << self.cluster_bits;
        let mut out = Vec::with_capacity(cluster);
        out.extend_from_slice(&MAGIC.to_be_bytes());
        out.extend_from_slice(&3u32.to_be_bytes());
        let name = self.backing_file.as_deref().unwrap_or("");
        // The name goes after the extensions; its offset is patched below.
        out.extend_from_slice(&0u64.to_be_bytes());
        out.extend_from_slice(&(name.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.cluster_bits.to_be_bytes());
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(&self.l1_size.to_be_bytes());
        out.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        out.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        out.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        out.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        out.extend_from_slice(&self.incompatible_features.to_be_bytes());
        out.extend_from_slice(&self.compatible_features.to_be_bytes());
        out.extend_from_slice(&self.autoclear_features.to_be_bytes());
        out.extend_from_slice(&self.refcount_order.to_be_bytes());
        out.extend_from_slice(&V3_HEADER_LEN.to_be_bytes());
        out.push(match self.compression {
            Compression::Zlib => 0,
            Compression::Zstd => 1,
        });
        out.resize(V3_HEADER_LEN as usize, 0);
        for e in &self.extensions {
            out.extend_from_slice(&e.kind.to_be_bytes());
            out.extend_from_slice(&(e.data.len() as u32).to_be_bytes());
            out.extend_from_slice(&e.data);
            out.resize(out.len().next_multiple_of(8), 0);
        }
        out.extend_from_slice(&[0u8; 8]);
        if !name.is_empty() {
            let at = out.len() as u64;
            if let Some(field) = out.get_mut(8..16) {
                field.copy_from_slice(&at.to_be_bytes());
            }
            out.extend_from_slice(name.as_bytes());
        }
        if out.len() > cluster {
            return Err(Error::InvalidOption {
                option: "backing_file",
                reason: format!(
                    "header, extensions and backing name need {} bytes, more than one {cluster}-byte cluster",
                    out.len()
                ),
            });
        }
        out.resize(cluster, 0);
        Ok(out)
    }
}

fn parse_extensions(area: &[u8], start: usize) -> Result<Vec<Extension>> {
    let mut out = Vec::new();
    let mut at = start;
    loop {
        let Some(head) = area.get(at..at + 8) else {
            // The extension area may simply run to the end of the cluster without an end marker
            // only if nothing is left; otherwise it is truncated.
            if at >= area.len() {
                return Ok(out);
            }
            return Err(invalid("extension", at as u64, "extension header crosses the end of the header cluster"));
        };
        let kind = be32(head, 0);
        let len = be32(head, 4) as usize;
        if kind == ext::END {
            return Ok(out);
        }
        let data = at
            .checked_add(8)
            .and_then(|s| Some((s, s.checked_add(len)?)))
            .and_then(|(s, e)| area.get(s..e))
            .ok_or(invalid("extension", at as u64, "extension data runs past the header cluster"))?;
        out.push(Extension { kind, data: data.to_vec() });
        at = at + 8 + len.next_multiple_of(8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 1 << 30,
            l1_size: 2,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LEN,
            compression: Compression::Zlib,
            backing_file: Some("base.qcow2".into()),
            extensions: vec![Extension { kind: ext::BACKING_FORMAT, data: b"qcow2".to_vec() }],
        }
    }

    #[test]
    fn encode_then_parse_round_trips() {
        let h = sample();
        let bytes = h.encode().unwrap();
        let mut back = Header::parse(&bytes).unwrap();
        back.backing_file_offset = 0;
        back.backing_file_size = 0;
        let mut want = h.clone();
        want.backing_file_offset = 0;
        assert_eq!(back, want);
        assert_eq!(Header::parse(&bytes).unwrap().backing_format().as_deref(), Some("qcow2"));
    }

    fn patched(at: usize, value: &[u8]) -> Vec<u8> {
        let mut b = sample().encode().unwrap();
        b[at..at + value.len()].copy_from_slice(value);
        b
    }

    fn field_of(r: Result<Header>) -> &'static str {
        match r {
            Err(Error::InvalidHeader { field, .. }) => field,
            other => panic!("expected InvalidHeader, got {other:?}"),
        }
    }

    #[test]
    fn header_rejects_a_cluster_size_outside_the_format_limits() {
        assert_eq!(field_of(Header::parse(&patched(20, &8u32.to_be_bytes()))), "cluster_bits");
        assert_eq!(field_of(Header::parse(&patched(20, &22u32.to_be_bytes()))), "cluster_bits");
    }

    #[test]
    fn header_rejects_absurd_table_sizes_without_allocating() {
        assert_eq!(field_of(Header::parse(&patched(36, &u32::MAX.to_be_bytes()))), "l1_size");
        assert_eq!(field_of(Header::parse(&patched(36, &1u32.to_be_bytes()))), "l1_size");
        assert_eq!(field_of(Header::parse(&patched(56, &u32::MAX.to_be_bytes()))), "refcount_table_clusters");
        assert_eq!(field_of(Header::parse(&patched(24, &u64::MAX.to_be_bytes()))), "size");
        assert_eq!(field_of(Header::parse(&patched(40, &0x30001u64.to_be_bytes()))), "l1_table_offset");
        assert_eq!(field_of(Header::parse(&patched(96, &7u32.to_be_bytes()))), "refcount_order");
    }

    #[test]
    fn header_refuses_unknown_incompatible_bits_and_encryption() {
        assert!(matches!(Header::parse(&patched(72, &(1u64 << 40).to_be_bytes())), Err(Error::Unsupported(_))));
        assert!(matches!(Header::parse(&patched(32, &1u32.to_be_bytes())), Err(Error::Unsupported(_))));
        assert!(matches!(Header::parse(&patched(0, b"QFI\0")), Err(Error::NotQcow2(_))));
    }

    #[test]
    fn read_header_extensions_rejects_a_length_past_the_extension_area() {
        let mut b = sample().encode().unwrap();
        let at = V3_HEADER_LEN as usize + 4;
        b[at..at + 4].copy_from_slice(&0x0100_0000u32.to_be_bytes());
        assert_eq!(field_of(Header::parse(&b)), "extension");
    }

    #[test]
    fn a_backing_name_outside_the_header_cluster_is_rejected() {
        let mut b = sample().encode().unwrap();
        b[8..16].copy_from_slice(&0xfff0u64.to_be_bytes());
        b[16..20].copy_from_slice(&100u32.to_be_bytes());
        assert_eq!(field_of(Header::parse(&b)), "backing_file_offset");
    }

    #[test]
    fn truncated_headers_are_errors_not_panics() {
        let b = sample().encode().unwrap();
        for cut in 0..200 {
            let _ = Header::parse(&b[..cut]);
        }
    }
}
