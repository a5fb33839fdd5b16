//! Checkpoint files read in place: safetensors, PyTorch's `torch.save`, and the
//! indexes of sharded checkpoints.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use half::{bf16, f16};
use safetensors::tensor::Dtype;

use super::torch;
use crate::error::{Error, Result};
use crate::tensor::{HostData, HostTensor};

/// A checkpoint, memory-mapped, with its index of tensors parsed and validated: a
/// safetensors file, a PyTorch one (`torch.save` of a state dict, PyTorch 1.6 or
/// later; nested dicts' keys and lists' positions joined with `.`), or the shards a `*.index.json` names
/// (as Hugging Face writes large checkpoints), each of either format. Tensors are read
/// (and converted) one at a time, so a large checkpoint that holds an LLM besides the
/// projector costs only the projector's bytes.
pub struct TensorFile {
    path: PathBuf,
    source: Source,
}

enum Source {
    /// One safetensors or PyTorch file.
    File(Contents),
    /// The shards an index names (files, never indexes themselves), and the shard
    /// that holds each tensor.
    Shards {
        shards: Vec<TensorFile>,
        shard_of: BTreeMap<String, usize>,
    },
}

/// One file's bytes and its index.
struct Contents {
    map: Bytes,
    tensors: BTreeMap<String, Entry>,
    metadata: Option<HashMap<String, String>>,
    /// A PyTorch checkpoint's storage records: CRC-32 checked on a tensor's first read.
    records: Vec<(torch::Record, OnceLock<bool>)>,
    /// Names a PyTorch checkpoint holds as something other than a dense tensor,
    /// with the reason.
    unsupported: BTreeMap<String, String>,
}

/// An index's `weight_map`, refusing a name given twice (JSON parsers keep the last,
/// which would pick one of two shards silently).
struct WeightMap(BTreeMap<String, String>);

impl<'de> serde::Deserialize<'de> for WeightMap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = WeightMap;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map from tensor names to shard files")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut items: A,
            ) -> std::result::Result<WeightMap, A::Error> {
                let mut map = BTreeMap::new();
                while let Some((name, file)) = items.next_entry::<String, String>()? {
                    if map.contains_key(&name) {
                        let e = format!("`{name}` is in the weight_map twice");
                        return Err(serde::de::Error::custom(e));
                    }
                    map.insert(name, file);
                }
                Ok(WeightMap(map))
            }
        }
        d.deserialize_map(Visitor)
    }
}

/// One tensor of a [`TensorFile`]: element type, shape and bytes in the file.
pub(super) struct Entry {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub range: Range<usize>,
    /// The PyTorch storage record it views.
    pub record: Option<usize>,
}

enum Bytes {
    Mapped(memmap2::Mmap),
    Static(&'static [u8]),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Static(s) => s,
        }
    }
}

impl TensorFile {
    /// A checkpoint image compiled into the program; `name` stands for its path
    /// in messages.
    pub fn from_static(name: &str, bytes: &'static [u8]) -> Result<Self> {
        Self::parse(PathBuf::from(name), Bytes::Static(bytes))
    }

    fn parse(path: PathBuf, map: Bytes) -> Result<Self> {
        let format = |reason: String| Error::Format {
            path: path.clone(),
            reason,
        };
        if torch::is_legacy(&map) {
            return Err(format(
                "a PyTorch checkpoint in the legacy format (before PyTorch 1.6), which this \
                 reader does not take: load it and torch.save it again with PyTorch 1.6 or later"
                    .into(),
            ));
        }
        if torch::is_archive(&map) {
            let index = torch::index(&map)
                .map_err(|e| format(format!("not a valid PyTorch checkpoint: {e}")))?;
            let contents = Contents {
                tensors: index.tensors,
                metadata: None,
                records: index
                    .records
                    .into_iter()
                    .map(|r| (r, OnceLock::new()))
                    .collect(),
                unsupported: index.unsupported,
                map,
            };
            return Ok(TensorFile {
                path,
                source: Source::File(contents),
            });
        }
        let (header_len, header) = safetensors::SafeTensors::read_metadata(&map)
            .map_err(|e| format(format!("not a valid safetensors file: {e}")))?;
        let data_start = 8 + header_len;
        let mut tensors = BTreeMap::new();
        for (name, info) in header.tensors() {
            let (start, end) = info.data_offsets;
            let range = data_start
                .checked_add(start)
                .zip(data_start.checked_add(end))
                .map(|(s, e)| s..e)
                .ok_or_else(|| {
                    format(format!(
                        "not a valid safetensors file: tensor `{name}` lies outside the file"
                    ))
                })?;
            let entry = Entry {
                dtype: info.dtype,
                shape: info.shape.clone(),
                range,
                record: None,
            };
            tensors.insert(name, entry);
        }
        let contents = Contents {
            map,
            tensors,
            metadata: header.metadata().clone(),
            records: Vec::new(),
            unsupported: BTreeMap::new(),
        };
        Ok(TensorFile {
            path,
            source: Source::File(contents),
        })
    }

    /// Memory-map the file at `path` and index its tensors: an unreadable file is
    /// [`Error::Io`], a malformed one [`Error::Format`]. No tensor is read yet. A path
    /// ending in `.json` is an index of shards (`{"weight_map": {name: file}}`, files
    /// beside it), each opened so.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if path.extension().is_some_and(|e| e == "json") {
            Self::open_index(path.to_path_buf())
        } else {
            Self::open_file(path.to_path_buf())
        }
    }

    fn open_file(path: PathBuf) -> Result<Self> {
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        // A directory cannot be mapped, and opening a FIFO would wait for a writer.
        if !std::fs::metadata(&path).map_err(io)?.is_file() {
            return Err(Error::Format {
                reason: "not a regular file".into(),
                path,
            });
        }
        let file = std::fs::File::open(&path).map_err(io)?;
        // SAFETY: the map is read-only and private to this value; as with any mapped
        // file, truncating it while mapped is the caller's responsibility.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::parse(path, Bytes::Mapped(map))
    }

    fn open_index(path: PathBuf) -> Result<Self> {
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: WeightMap,
        }
        let format = |reason: String| Error::Format {
            path: path.clone(),
            reason: format!("not a valid checkpoint index: {reason}"),
        };
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let index: Index = serde_json::from_str(&text).map_err(|e| format(e.to_string()))?;
        if index.weight_map.0.is_empty() {
            return Err(format("its weight_map names no tensor".into()));
        }
        let dir = path.parent().unwrap_or(Path::new(""));
        let mut shards: Vec<TensorFile> = Vec::new();
        let mut opened: HashMap<&str, usize> = HashMap::new();
        let mut shard_of = BTreeMap::new();
        for (name, file) in &index.weight_map.0 {
            let i = match opened.get(file.as_str()) {
                Some(&i) => i,
                None => {
                    // Only files beside the index: no absolute paths, no `..`.
                    let relative = Path::new(file);
                    let plain = relative
                        .components()
                        .all(|c| matches!(c, std::path::Component::Normal(_)));
                    if !plain || file.is_empty() {
                        return Err(format(format!(
                            "it maps `{name}` to `{file}`, which is not a file beside it"
                        )));
                    }
                    shards.push(Self::open_file(dir.join(relative))?);
                    opened.insert(file, shards.len() - 1);
                    shards.len() - 1
                }
            };
            if !shards[i].holds(name) {
                return Err(format(format!(
                    "it maps `{name}` to {file}, which does not hold it"
                )));
            }
            shard_of.insert(name.clone(), i);
        }
        Ok(TensorFile {
            path,
            source: Source::Shards { shards, shard_of },
        })
    }

    /// The file's path (for [`from_static`](Self::from_static), its `name`), as messages print it.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> BTreeSet<String> {
        match &self.source {
            Source::File(c) => c.tensors.keys().cloned().collect(),
            Source::Shards { shards, shard_of } => shard_of
                .iter()
                .filter(|&(name, &i)| shards[i].contains(name))
                .map(|(name, _)| name.clone())
                .collect(),
        }
    }

    /// Whether the file holds a tensor named `name` (the full key, prefix included).
    pub fn contains(&self, name: &str) -> bool {
        match &self.source {
            Source::File(c) => c.tensors.contains_key(name),
            Source::Shards { shards, shard_of } => shard_of
                .get(name)
                .is_some_and(|&i| shards[i].contains(name)),
        }
    }

    /// The free-form string metadata of a safetensors header (PyTorch checkpoints
    /// and indexes of shards have none).
    pub fn metadata(&self) -> Option<&HashMap<String, String>> {
        match &self.source {
            Source::File(c) => c.metadata.as_ref(),
            Source::Shards { .. } => None,
        }
    }

    /// Whether the file holds `name`, as a tensor or as something [`get`](Self::get)
    /// says it cannot read.
    fn holds(&self, name: &str) -> bool {
        match &self.source {
            Source::File(c) => c.tensors.contains_key(name) || c.unsupported.contains_key(name),
            Source::Shards { shard_of, .. } => shard_of.contains_key(name),
        }
    }

    /// The shape of a tensor, without reading it.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        match &self.source {
            Source::File(c) => c.tensors.get(name).map(|e| e.shape.as_slice()),
            Source::Shards { shards, shard_of } => shards.get(*shard_of.get(name)?)?.shape(name),
        }
    }

    /// Read one floating-point tensor.
    pub fn get(&self, name: &str) -> Result<HostTensor> {
        let (entry, bytes) = self.entry(name)?;
        let data = match entry.dtype {
            Dtype::F64 => HostData::F64(bytemuck::pod_collect_to_vec(bytes)),
            Dtype::F32 => HostData::F32(bytemuck::pod_collect_to_vec(bytes)),
            Dtype::F16 => HostData::F16(bytemuck::pod_collect_to_vec::<u8, f16>(bytes)),
            Dtype::BF16 => HostData::BF16(bytemuck::pod_collect_to_vec::<u8, bf16>(bytes)),
            other => {
                return Err(Error::DType {
                    key: name.to_string(),
                    expected: "f64, f32, f16 or bf16".into(),
                    found: format!("{other:?}"),
                })
            }
        };
        HostTensor::new(entry.shape.clone(), data)
    }

    /// Read an integer tensor (i64, i32, u32 or u8) as i64, e.g. token ids.
    pub fn get_ids(&self, name: &str) -> Result<(Vec<usize>, Vec<i64>)> {
        let (entry, bytes) = self.entry(name)?;
        let ids = match entry.dtype {
            Dtype::I64 => bytemuck::pod_collect_to_vec::<u8, i64>(bytes),
            Dtype::I32 => bytemuck::pod_collect_to_vec::<u8, i32>(bytes)
                .into_iter()
                .map(i64::from)
                .collect(),
            Dtype::U32 => bytemuck::pod_collect_to_vec::<u8, u32>(bytes)
                .into_iter()
                .map(i64::from)
                .collect(),
            Dtype::U8 | Dtype::BOOL => bytes.iter().map(|&b| i64::from(b)).collect(),
            other => {
                return Err(Error::DType {
                    key: name.to_string(),
                    expected: "i64, i32, u32, u8 or bool".into(),
                    found: format!("{other:?}"),
                })
            }
        };
        Ok((entry.shape.clone(), ids))
    }

    /// A tensor's entry and bytes (from the shard that holds it), its storage
    /// record checked against its CRC-32.
    fn entry(&self, name: &str) -> Result<(&Entry, &[u8])> {
        let missing = || Error::MissingKey {
            key: name.to_string(),
            hint: format!(" in {}", self.path.display()),
        };
        let c = match &self.source {
            Source::File(c) => c,
            Source::Shards { shards, shard_of } => {
                let shard = shard_of.get(name).and_then(|&i| shards.get(i));
                return shard.ok_or_else(missing)?.entry(name);
            }
        };
        let format = |reason: String| Error::Format {
            path: self.path.clone(),
            reason,
        };
        let Some(entry) = c.tensors.get(name) else {
            return Err(match c.unsupported.get(name) {
                Some(why) => format(why.clone()),
                None => missing(),
            });
        };
        let bytes = c
            .map
            .get(entry.range.clone())
            .ok_or_else(|| format(format!("tensor `{name}` lies outside the file")))?;
        if let Some((record, checked)) = entry.record.and_then(|r| c.records.get(r)) {
            let intact = checked.get_or_init(|| {
                c.map
                    .get(record.range.clone())
                    .is_some_and(|b| crc32fast::hash(b) == record.crc32)
            });
            if !*intact {
                return Err(format(format!(
                    "the storage of tensor `{name}` fails its CRC-32 check: the file is damaged"
                )));
            }
        }
        Ok((entry, bytes))
    }
}
