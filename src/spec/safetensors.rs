//! Reads the headers of a safetensors checkpoint (one file, or the shards an
//! `model.safetensors.index.json` names) for its tensors' names, dtypes and shapes: exact
//! parameter counts of any checkpoint without reading a byte of the weights.
//!
//! A safetensors file is an 8-byte little-endian header length, that many bytes of JSON (each
//! tensor's dtype, shape and byte range), then the data. Only the first `8 + length` bytes are
//! read; the file's size is checked against the byte ranges the header describes, so a truncated
//! download is reported rather than counted.

use crate::error::input_err;
use safetensors::tensor::Metadata;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};

/// The safetensors format's own bound on the header (safetensors' `MAX_HEADER_SIZE`).
const MAX_HEADER: u64 = 100_000_000;

/// One tensor of the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tensor {
    pub name: String,
    /// safetensors' dtype name (`F32`, `BF16`, `F8_E4M3`, `U8`, ...)
    pub dtype: String,
    pub shape: Vec<u64>,
    /// elements (the product of the shape; 1 for a scalar)
    pub elems: u64,
    /// bytes of its data in the file
    pub bytes: u64,
}

/// Every tensor of a checkpoint, sorted by name, and the files they were read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub files: Vec<PathBuf>,
    pub tensors: Vec<Tensor>,
}

/// Elements and bytes of one dtype.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DtypeCount {
    pub dtype: String,
    pub elems: u64,
    pub bytes: u64,
}

impl Checkpoint {
    /// Reads a `.safetensors` file's header, or, for a `*.index.json`, the header of every
    /// shard its `weight_map` names (in the index's directory).
    pub fn load(path: &Path) -> anyhow::Result<Checkpoint> {
        let is_index = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().ends_with(".json"));
        if is_index {
            load_index(path)
        } else {
            let tensors = read_header(path)?;
            Ok(Checkpoint {
                files: vec![path.to_path_buf()],
                tensors: sorted(tensors),
            })
        }
    }

    /// Elements over all tensors.
    pub fn elems(&self) -> u64 {
        self.tensors.iter().map(|t| t.elems).sum()
    }

    /// Elements and bytes per dtype, by dtype name.
    pub fn by_dtype(&self) -> Vec<DtypeCount> {
        let mut m: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        for t in &self.tensors {
            let e = m.entry(&t.dtype).or_default();
            e.0 += t.elems;
            e.1 += t.bytes;
        }
        m.into_iter()
            .map(|(dtype, (elems, bytes))| DtypeCount {
                dtype: dtype.to_string(),
                elems,
                bytes,
            })
            .collect()
    }

    /// The directory holding the checkpoint (where a config.json would sit beside it).
    pub fn dir(&self) -> Option<&Path> {
        self.files.first().and_then(|f| f.parent())
    }
}

fn sorted(mut tensors: Vec<Tensor>) -> Vec<Tensor> {
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    tensors
}

fn unreadable<T>(path: &Path, why: impl std::fmt::Display) -> anyhow::Result<T> {
    input_err(
        "safetensors",
        format!(
            "{} {why}; accepted a .safetensors file or a model.safetensors.index.json",
            path.display()
        ),
    )
}

/// The tensors of one safetensors file, from its header only.
pub fn read_header(path: &Path) -> anyhow::Result<Vec<Tensor>> {
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => return unreadable(path, format_args!("cannot be read ({e})")),
    };
    let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut len = [0u8; 8];
    if file.read_exact(&mut len).is_err() {
        return unreadable(path, "is shorter than the 8-byte header length");
    }
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER || n > file_len.saturating_sub(8) {
        return unreadable(
            path,
            format_args!(
                "declares a {n}-byte header in a {file_len}-byte file: not a safetensors file"
            ),
        );
    }
    let mut header = vec![0u8; n as usize];
    if let Err(e) = file.read_exact(&mut header) {
        return unreadable(path, format_args!("header cannot be read ({e})"));
    }
    let meta: Metadata = match serde_json::from_slice(&header) {
        Ok(m) => m,
        Err(e) => return unreadable(path, format_args!("has an invalid header ({e})")),
    };
    let data_len = meta.data_len() as u64;
    if 8 + n + data_len != file_len {
        return unreadable(
            path,
            format_args!(
                "is {file_len} bytes but its header describes {} (truncated or not safetensors)",
                8 + n + data_len
            ),
        );
    }
    let mut out = Vec::new();
    for (name, info) in meta.tensors() {
        let elems = info.shape.iter().map(|&d| d as u64).product::<u64>();
        out.push(Tensor {
            name,
            dtype: format!("{:?}", info.dtype),
            shape: info.shape.iter().map(|&d| d as u64).collect(),
            elems,
            bytes: (info.data_offsets.1 - info.data_offsets.0) as u64,
        });
    }
    Ok(out)
}

/// `model.safetensors.index.json`: `{"weight_map": {"tensor name": "shard file", ...}}`.
#[derive(serde::Deserialize)]
struct Index {
    weight_map: BTreeMap<String, String>,
}

fn load_index(path: &Path) -> anyhow::Result<Checkpoint> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => return unreadable(path, format_args!("cannot be read ({e})")),
    };
    let index: Index = match serde_json::from_str(&text) {
        Ok(i) => i,
        Err(e) => return unreadable(path, format_args!("is not a safetensors index ({e})")),
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let shards: BTreeSet<&str> = index.weight_map.values().map(String::as_str).collect();
    let mut files = Vec::new();
    let mut tensors = Vec::new();
    for shard in shards {
        // a shard is a file name beside the index, never a path elsewhere
        if shard.contains('/') || shard.contains('\\') || shard == ".." {
            return unreadable(
                path,
                format_args!("names shard '{shard}', not a file name beside the index"),
            );
        }
        let file = dir.join(shard);
        for t in read_header(&file)? {
            match index.weight_map.get(&t.name) {
                Some(s) if s == shard => tensors.push(t),
                // a tensor the index places in another shard (or not at all): the index is
                // what loaders follow, so count it where the index says
                _ => {}
            }
        }
        files.push(file);
    }
    let found: BTreeSet<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
    if let Some(missing) = index
        .weight_map
        .keys()
        .find(|k| !found.contains(k.as_str()))
    {
        return unreadable(
            path,
            format_args!(
                "maps '{missing}' to {} but that shard's header has no such tensor",
                index.weight_map[missing]
            ),
        );
    }
    Ok(Checkpoint {
        files,
        tensors: sorted(tensors),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file with the given (name, dtype, shape, element bytes) tensors: the header
    /// and zero-filled data, as the format lays them out.
    fn write(path: &Path, tensors: &[(&str, &str, &[u64], u64)]) {
        let mut header = serde_json::Map::new();
        let mut off = 0u64;
        for (name, dtype, shape, eb) in tensors {
            let n = shape.iter().product::<u64>() * eb;
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [off, off + n]}),
            );
            off += n;
        }
        let h = serde_json::to_vec(&header).unwrap();
        let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
        bytes.extend(h);
        bytes.extend(std::iter::repeat_n(0u8, off as usize));
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn header_counts_and_dtypes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model.safetensors");
        write(
            &p,
            &[
                ("b.weight", "BF16", &[3, 5], 2),
                ("a.bias", "F32", &[5], 4),
                ("scalar", "F32", &[], 4),
            ],
        );
        let c = Checkpoint::load(&p).unwrap();
        assert_eq!(c.elems(), 15 + 5 + 1);
        let names: Vec<&str> = c.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a.bias", "b.weight", "scalar"]);
        assert_eq!(
            c.by_dtype(),
            vec![
                DtypeCount {
                    dtype: "BF16".into(),
                    elems: 15,
                    bytes: 30
                },
                DtypeCount {
                    dtype: "F32".into(),
                    elems: 6,
                    bytes: 24
                },
            ]
        );
    }

    #[test]
    fn truncated_file_is_an_input_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model.safetensors");
        write(&p, &[("w", "F32", &[4, 4], 4)]);
        let full = std::fs::read(&p).unwrap();
        std::fs::write(&p, &full[..full.len() - 1]).unwrap();
        let err = Checkpoint::load(&p).unwrap_err();
        assert_eq!(crate::error::exit_code(&err), 2);
        assert!(format!("{err}").contains("truncated"), "{err}");
        std::fs::write(&p, b"not a checkpoint at all").unwrap();
        let err = Checkpoint::load(&p).unwrap_err();
        assert!(
            format!("{err}").starts_with("invalid safetensors: "),
            "{err}"
        );
    }

    #[test]
    fn index_reads_every_shard_header() {
        let dir = tempfile::tempdir().unwrap();
        write(
            &dir.path().join("model-00001-of-00002.safetensors"),
            &[("x.weight", "F16", &[2, 8], 2)],
        );
        write(
            &dir.path().join("model-00002-of-00002.safetensors"),
            &[("y.weight", "F16", &[8], 2), ("z.weight", "F32", &[3], 4)],
        );
        let index = dir.path().join("model.safetensors.index.json");
        std::fs::write(
            &index,
            r#"{"metadata":{"total_size":60},"weight_map":{
                "x.weight":"model-00001-of-00002.safetensors",
                "y.weight":"model-00002-of-00002.safetensors",
                "z.weight":"model-00002-of-00002.safetensors"}}"#,
        )
        .unwrap();
        let c = Checkpoint::load(&index).unwrap();
        assert_eq!(c.files.len(), 2);
        assert_eq!(c.elems(), 16 + 8 + 3);
        // an index naming a tensor no shard has is reported with the tensor's name
        std::fs::write(
            &index,
            r#"{"weight_map":{"x.weight":"model-00001-of-00002.safetensors",
                "q.weight":"model-00001-of-00002.safetensors"}}"#,
        )
        .unwrap();
        let err = Checkpoint::load(&index).unwrap_err();
        assert!(format!("{err}").contains("'q.weight'"), "{err}");
    }
}
