//! Checkpoints (safetensors, or PyTorch's `torch.save`): reading tensors (f64, f32,
//! f16, bf16) with checks that name the key, and the projector's weights under
//! PyTorch's exact state-dict names.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use half::{bf16, f16};
use safetensors::tensor::Dtype;

use crate::config::{Modality, ProjectorConfig, Variant};
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::tensor::{try_filled, DType, HostData, HostTensor};

mod torch;

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
struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    range: Range<usize>,
    /// The PyTorch storage record it views.
    record: Option<usize>,
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

impl safetensors::View for &HostTensor {
    fn dtype(&self) -> Dtype {
        match HostTensor::dtype(self) {
            DType::F64 => Dtype::F64,
            DType::F32 => Dtype::F32,
            DType::F16 => Dtype::F16,
            DType::BF16 => Dtype::BF16,
        }
    }

    fn shape(&self) -> &[usize] {
        HostTensor::shape(self)
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(self.as_bytes())
    }

    fn data_len(&self) -> usize {
        self.as_bytes().len()
    }
}

/// Write named tensors to a safetensors file, with optional string metadata.
pub fn save(
    path: impl AsRef<Path>,
    tensors: &BTreeMap<String, HostTensor>,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let path = path.as_ref();
    safetensors::serialize_to_file(tensors.iter(), metadata, path).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(source) => Error::Io {
            path: path.to_path_buf(),
            source,
        },
        other => Error::Format {
            path: path.to_path_buf(),
            reason: other.to_string(),
        },
    })
}

/// Every parameter of a projector, as `(name, shape)` under the config's variant's
/// PyTorch names (no checkpoint prefix), in state-dict order.
pub fn layout(c: &ProjectorConfig) -> Vec<(String, Vec<usize>)> {
    let (d, f) = (c.d_model, c.ffn_dim);
    let mut out = vec![("query_embs".to_string(), vec![1, c.n_out, d])];
    let fc = c.variant.input_linear();
    out.push((format!("{fc}.weight"), vec![d, c.in_dim]));
    out.push((format!("{fc}.bias"), vec![d]));
    let attn = |out: &mut Vec<(String, Vec<usize>)>, p: &str| {
        // Saturating: a size past usize is then refused by the count over it
        // (ProjectorConfig::parameter_count) instead of wrapping.
        out.push((format!("{p}.in_proj_weight"), vec![d.saturating_mul(3), d]));
        out.push((format!("{p}.in_proj_bias"), vec![d.saturating_mul(3)]));
        out.push((format!("{p}.out_proj.weight"), vec![d, d]));
        out.push((format!("{p}.out_proj.bias"), vec![d]));
    };
    let ffn_and_norms = |out: &mut Vec<(String, Vec<usize>)>, p: &str, norms: usize| {
        out.push((format!("{p}.linear1.weight"), vec![f, d]));
        out.push((format!("{p}.linear1.bias"), vec![f]));
        out.push((format!("{p}.linear2.weight"), vec![d, f]));
        out.push((format!("{p}.linear2.bias"), vec![d]));
        for n in 1..=norms {
            out.push((format!("{p}.norm{n}.weight"), vec![d]));
            out.push((format!("{p}.norm{n}.bias"), vec![d]));
        }
    };
    for l in 0..c.encoder_layers {
        let p = format!("tfm.encoder.layers.{l}");
        attn(&mut out, &format!("{p}.self_attn"));
        ffn_and_norms(&mut out, &p, 2);
    }
    out.push(("tfm.encoder.norm.weight".into(), vec![d]));
    out.push(("tfm.encoder.norm.bias".into(), vec![d]));
    for l in 0..c.decoder_layers {
        let p = format!("tfm.decoder.layers.{l}");
        attn(&mut out, &format!("{p}.self_attn"));
        attn(&mut out, &format!("{p}.multihead_attn"));
        ffn_and_norms(&mut out, &p, 3);
    }
    out.push(("tfm.decoder.norm.weight".into(), vec![d]));
    out.push(("tfm.decoder.norm.bias".into(), vec![d]));
    let m = c.variant.output_linear();
    out.push((format!("{m}.weight"), vec![c.out_dim, d]));
    out.push((format!("{m}.bias"), vec![c.out_dim]));
    out
}

/// How to find one projector inside a checkpoint. Every field is optional:
/// what is not given is detected from the file.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// The key prefix (e.g. `gen_text_hidden_fcs.0.`); `Some("")` means none.
    pub prefix: Option<String>,
    /// Which projector: narrows the prefixes searched to its checkpoint prefix (alone,
    /// under a wrapper's prefix such as `module.`, or none), and the shapes must then
    /// match its preset, whose `n_in` the config takes.
    /// Unset: the prefix's modality, or the one preset the shapes fit; else no `n_in`.
    pub modality: Option<Modality>,
    /// Which names the weights must use (`fc`/`model` or `in_fc`/`out_fc`); weights
    /// under the other names are an error. Unset: read off the names.
    pub variant: Option<Variant>,
    /// Attention heads (cannot be read off the shapes; default 4).
    pub heads: Option<usize>,
}

/// The weights of one projector, with its config, under canonical names.
#[derive(Clone, Debug)]
pub struct ProjectorWeights {
    config: ProjectorConfig,
    /// Which NExT-GPT projector these are, when known.
    modality: Option<Modality>,
    tensors: BTreeMap<String, HostTensor>,
}

const DEFAULT_HEADS: usize = 4;

impl ProjectorWeights {
    /// The config the weights were checked against (for [`load`](Self::load), read off
    /// the shapes).
    pub fn config(&self) -> &ProjectorConfig {
        &self.config
    }

    /// Which NExT-GPT projector these are, when known (given, or detected by
    /// [`load`](Self::load)).
    pub fn modality(&self) -> Option<Modality> {
        self.modality
    }

    /// A parameter by its canonical (unprefixed) name.
    pub fn get(&self, name: &str) -> Result<&HostTensor> {
        self.tensors.get(name).ok_or_else(|| Error::MissingKey {
            key: name.to_string(),
            hint: String::new(),
        })
    }

    /// All parameters by canonical name.
    pub fn tensors(&self) -> &BTreeMap<String, HostTensor> {
        &self.tensors
    }

    /// Build from named tensors (canonical names), checking every name, shape and
    /// value against `config`.
    pub fn from_tensors(
        config: ProjectorConfig,
        modality: Option<Modality>,
        mut tensors: BTreeMap<String, HostTensor>,
    ) -> Result<Self> {
        config.validate()?;
        let mut checked = BTreeMap::new();
        for (name, shape) in layout(&config) {
            let t = tensors.remove(&name).ok_or_else(|| Error::MissingKey {
                key: name.clone(),
                hint: String::new(),
            })?;
            t.check_shape(&name, &shape)?;
            t.check_finite(&name)?;
            checked.insert(name, t);
        }
        if let Some(extra) = tensors.keys().next() {
            return Err(Error::invalid(format!(
                "unexpected tensor `{extra}` for a projector with {} encoder and {} decoder layers",
                config.encoder_layers, config.decoder_layers
            )));
        }
        Ok(ProjectorWeights {
            config,
            modality,
            tensors: checked,
        })
    }

    /// Seeded random weights with PyTorch's initialisation: `nn.Linear` layers
    /// (`fc`/`model`) kaiming-uniform (`U(±1/sqrt(fan_in))` for weight and bias),
    /// every Transformer matrix xavier-uniform (as `nn.Transformer` resets them),
    /// attention biases 0, FFN biases `U(±1/sqrt(fan_in))`, LayerNorm 1 and 0,
    /// `query_embs` standard normal.
    pub fn random(config: ProjectorConfig, modality: Option<Modality>, seed: u64) -> Result<Self> {
        config.validate()?;
        let mut rng = Rng::new(seed);
        let io_linears = [
            config.variant.input_linear(),
            config.variant.output_linear(),
        ];
        let shapes: BTreeMap<String, Vec<usize>> = layout(&config).into_iter().collect();
        let mut tensors = BTreeMap::new();
        for (name, shape) in &shapes {
            let n = crate::tensor::checked_numel(shape, name)?;
            let mut data = try_filled(n, 0.0, name)?;
            let (module, param) = name.rsplit_once('.').unwrap_or(("", name));
            if name == "query_embs" {
                rng.fill_normal(&mut data);
            } else if module.ends_with("norm") || module.contains(".norm") {
                data.fill(if param == "weight" { 1.0 } else { 0.0 });
            } else if param == "in_proj_bias" || module.ends_with("out_proj") && param == "bias" {
                // zeros
            } else if io_linears.contains(&module) || shape.len() == 1 {
                // U(±1/sqrt(fan_in)) for a Linear's own weight and bias; fan_in from its weight.
                let fan_in = shapes.get(&format!("{module}.weight")).map_or(1, |s| s[1]);
                let b = 1.0 / (fan_in as f64).sqrt();
                rng.fill_uniform(&mut data, -b, b);
            } else {
                // nn.Transformer resets every matrix with xavier_uniform.
                let b = (6.0 / (shape[0] as f64 + shape[1] as f64)).sqrt();
                rng.fill_uniform(&mut data, -b, b);
            }
            let t = HostTensor::from_f64(shape.clone(), data)?.to_dtype(DType::F32);
            tensors.insert(name.clone(), t);
        }
        Self::from_tensors(config, modality, tensors)
    }

    /// Find, read and check one projector in a checkpoint.
    pub fn load(file: &TensorFile, sel: &Selection) -> Result<Self> {
        let prefix = find_prefix(file, sel)?;
        let key = |name: &str| format!("{prefix}{name}");
        let shape_of = |name: &str| -> Result<Vec<usize>> {
            file.shape(&key(name))
                .map(<[usize]>::to_vec)
                .ok_or_else(|| Error::MissingKey {
                    key: key(name),
                    hint: format!(" in {}", file.path().display()),
                })
        };
        // Names tell the variant.
        let variant = Variant::ALL
            .into_iter()
            .find(|v| file.contains(&key(&format!("{}.weight", v.input_linear()))))
            .ok_or_else(|| Error::MissingKey {
                key: key("fc.weight"),
                hint: format!(
                    " (or `{}`, the v1.5 name) in {}",
                    key("in_fc.weight"),
                    file.path().display()
                ),
            })?;
        if let Some(want) = sel.variant {
            if want != variant {
                return Err(Error::invalid(format!(
                    "--variant {} was asked for, but the weights under `{prefix}` use {} names",
                    want.name(),
                    variant.name()
                )));
            }
        }
        // Shapes tell the rest.
        let dim = |name: &str, rank: usize, axis: usize| -> Result<usize> {
            let s = shape_of(name)?;
            if s.len() != rank {
                return Err(Error::invalid(format!(
                    "tensor `{}`: expected {rank} dimensions, found shape {s:?}",
                    key(name)
                )));
            }
            Ok(s[axis])
        };
        // Layers: every index with any key, which must run 0, 1, .. without a
        // gap; a layer with some tensors missing is reported by name below
        // instead of being dropped.
        let names = file.names();
        let count_layers = |stack: &str| -> Result<usize> {
            let head = key(&format!("tfm.{stack}.layers."));
            let found: BTreeSet<usize> = names
                .iter()
                .filter_map(|k| {
                    k.strip_prefix(&head)?
                        .split('.')
                        .next()?
                        .parse::<usize>()
                        .ok()
                })
                .collect();
            // The first index absent: 0 where none is found, else a gap below the last.
            let gap = found
                .iter()
                .zip(0..)
                .find(|(&l, i)| l != *i)
                .map(|(_, i)| i);
            match (gap, found.last()) {
                (None, Some(_)) => Ok(found.len()),
                (gap, last) => {
                    let missing = gap.unwrap_or(0);
                    let why = match last {
                        Some(last) => {
                            format!("{stack} layer {last} has tensors, layer {missing} none")
                        }
                        None => format!("no {stack} layer found"),
                    };
                    Err(Error::MissingKey {
                        key: key(&format!("tfm.{stack}.layers.{missing}.norm1.weight")),
                        hint: format!(" in {}: {why}", file.path().display()),
                    })
                }
            }
        };
        let config = ProjectorConfig {
            variant,
            in_dim: dim(&format!("{}.weight", variant.input_linear()), 2, 1)?,
            d_model: dim("query_embs", 3, 2)?,
            heads: sel.heads.unwrap_or(DEFAULT_HEADS),
            ffn_dim: dim("tfm.encoder.layers.0.linear1.weight", 2, 0)?,
            encoder_layers: count_layers("encoder")?,
            decoder_layers: count_layers("decoder")?,
            n_out: dim("query_embs", 3, 1)?,
            out_dim: dim(&format!("{}.weight", variant.output_linear()), 2, 0)?,
            n_in: None,
            eps: 1e-5,
        };
        // A named modality must match its preset; otherwise a preset with these
        // shapes (the prefix's own first) tells n_in, and a custom config has none.
        let (config, modality) = match sel.modality {
            Some(m) => (match_preset(config, m)?, Some(m)),
            None => {
                let fits = |m: Modality| match_preset(config.clone(), m).ok().map(|c| (c, m));
                let by_prefix = Modality::from_prefix(&prefix).and_then(|(m, _)| fits(m));
                let mut all = Modality::ALL.into_iter().filter_map(fits);
                match (by_prefix, all.next(), all.next()) {
                    (Some((c, m)), _, _) | (None, Some((c, m)), None) => (c, Some(m)),
                    _ => (config, None),
                }
            }
        };
        // The shapes come from the file: sizes past usize are refused here.
        config.validate()?;
        let mut tensors = BTreeMap::new();
        for (name, _) in layout(&config) {
            let t = file.get(&key(&name))?;
            tensors.insert(name, t);
        }
        let prefixed = |e: Error| match e {
            Error::Shape {
                key: k,
                expected,
                found,
            } => Error::Shape {
                key: key(&k),
                expected,
                found,
            },
            Error::NonFinite {
                key: k,
                index,
                value,
            } => Error::NonFinite {
                key: key(&k),
                index,
                value,
            },
            other => other,
        };
        Self::from_tensors(config, modality, tensors).map_err(prefixed)
    }

    /// The parameters under PyTorch's names with `prefix` in front.
    pub fn state_dict(&self, prefix: &str) -> BTreeMap<String, HostTensor> {
        self.tensors
            .iter()
            .map(|(k, v)| (format!("{prefix}{k}"), v.clone()))
            .collect()
    }

    /// Write the parameters to a safetensors file under PyTorch's names.
    pub fn save(&self, path: impl AsRef<Path>, prefix: &str) -> Result<()> {
        save(path, &self.state_dict(prefix), None)
    }
}

/// `config` with the modality's preset n_in, if its shapes are that preset's.
fn match_preset(mut config: ProjectorConfig, m: Modality) -> Result<ProjectorConfig> {
    let p = ProjectorConfig::preset(m, config.variant);
    let checks = [
        ("in_dim", p.in_dim, config.in_dim),
        ("d_model", p.d_model, config.d_model),
        ("ffn_dim", p.ffn_dim, config.ffn_dim),
        ("encoder layers", p.encoder_layers, config.encoder_layers),
        ("decoder layers", p.decoder_layers, config.decoder_layers),
        ("n_out", p.n_out, config.n_out),
        ("out_dim", p.out_dim, config.out_dim),
    ];
    for (what, want, found) in checks {
        if want != found {
            return Err(Error::invalid(format!(
                "the weights do not match the {} {} preset: {what} expected {want}, found {found}",
                config.variant.name(),
                m.name()
            )));
        }
    }
    config.n_in = p.n_in;
    Ok(config)
}

/// The checkpoint prefixes of the projectors in `file` (each `{prefix}query_embs`),
/// sorted; `""` for one stored without a prefix.
pub fn projector_prefixes(file: &TensorFile) -> Vec<String> {
    file.names()
        .into_iter()
        .filter_map(|k| k.strip_suffix("query_embs").map(str::to_string))
        .collect()
}

/// The checkpoint prefix of the projector to load.
fn find_prefix(file: &TensorFile, sel: &Selection) -> Result<String> {
    let found = projector_prefixes(file);
    let list = || {
        if found.is_empty() {
            "no projector (no `query_embs` key) in the file".to_string()
        } else {
            format!("projectors found under prefixes {found:?}")
        }
    };
    if let Some(p) = &sel.prefix {
        if found.contains(p) {
            return Ok(p.clone());
        }
        return Err(Error::MissingKey {
            key: format!("{p}query_embs"),
            hint: format!(" in {}: {}", file.path().display(), list()),
        });
    }
    let candidates: Vec<&String> = match sel.modality {
        Some(m) => found
            .iter()
            .filter(|p| {
                p.is_empty()
                    || Variant::ALL
                        .iter()
                        .any(|&v| sel.variant.is_none_or(|w| w == v) && m.is_prefix(v, p))
            })
            .collect(),
        None => found.iter().collect(),
    };
    match candidates.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(Error::MissingKey {
            key: match sel.modality {
                Some(m) => format!(
                    "{}query_embs",
                    m.checkpoint_prefix(sel.variant.unwrap_or(Variant::Legacy))
                ),
                None => "query_embs".into(),
            },
            hint: format!(" in {}: {}", file.path().display(), list()),
        }),
        _ => Err(Error::invalid(format!(
            "{}: several projectors ({found:?}); choose one with --modality or --prefix",
            file.path().display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkpoint of empty F32 tensors of the given shapes: sizes a header
    /// can claim without the data to back them.
    fn empty_tensors(tensors: &[(&str, &[usize])]) -> TensorFile {
        let entries: Vec<String> = tensors
            .iter()
            .map(|(name, shape)| {
                format!(r#""{name}":{{"dtype":"F32","shape":{shape:?},"data_offsets":[0,0]}}"#)
            })
            .collect();
        let header = format!("{{{}}}", entries.join(","));
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        TensorFile::from_static("empty.safetensors", Box::leak(bytes.into_boxed_slice())).unwrap()
    }

    /// Layer indices and dimensions come from the header: absurd ones are
    /// errors before anything is sized by them (a layer index of 2^64 - 1
    /// used to be counted to, a d_model of 2^63 tripled).
    #[test]
    fn absurd_sizes_in_a_header_are_errors() {
        let huge = format!("tfm.encoder.layers.{}.norm1.weight", usize::MAX);
        let file = empty_tensors(&[
            ("query_embs", &[1, 0, 8]),
            ("fc.weight", &[0, 4]),
            ("tfm.encoder.layers.0.linear1.weight", &[0, 8]),
            ("tfm.encoder.layers.0.norm1.weight", &[0]),
            (&huge, &[0]),
            ("model.weight", &[0, 8]),
        ]);
        let e = ProjectorWeights::load(&file, &Selection::default()).unwrap_err();
        assert!(
            e.to_string().contains(&format!(
                "encoder layer {} has tensors, layer 1 none",
                usize::MAX
            )),
            "{e}"
        );

        let file = empty_tensors(&[
            ("query_embs", &[1, 0, 1 << 63]),
            ("fc.weight", &[0, 4]),
            ("tfm.encoder.layers.0.linear1.weight", &[16, 0]),
            ("tfm.decoder.layers.0.linear1.weight", &[16, 0]),
            ("model.weight", &[4, 0]),
        ]);
        let e = ProjectorWeights::load(&file, &Selection::default()).unwrap_err();
        assert!(e.to_string().contains("n_out must be at least 1"), "{e}");

        // The other dims 1 or more: the in_dim of a zero-row input linear.
        let file = empty_tensors(&[
            ("query_embs", &[0, 2, 8]),
            ("fc.weight", &[0, 1 << 62]),
            ("tfm.encoder.layers.0.linear1.weight", &[16, 0]),
            ("tfm.decoder.layers.0.linear1.weight", &[16, 0]),
            ("model.weight", &[4, 0]),
        ]);
        let e = ProjectorWeights::load(&file, &Selection::default()).unwrap_err();
        assert!(matches!(e, Error::Overflow(_)), "{e}");
    }

    #[test]
    fn layers_must_count_from_zero() {
        let file = empty_tensors(&[
            ("query_embs", &[0, 2, 8]),
            ("fc.weight", &[0, 4]),
            ("tfm.encoder.layers.0.linear1.weight", &[16, 0]),
            ("tfm.decoder.layers.1.linear1.weight", &[16, 0]),
            ("model.weight", &[4, 0]),
        ]);
        let e = ProjectorWeights::load(&file, &Selection::default()).unwrap_err();
        assert!(
            e.to_string()
                .contains("decoder layer 1 has tensors, layer 0 none"),
            "{e}"
        );
        assert!(
            e.to_string().contains("tfm.decoder.layers.0.norm1.weight"),
            "{e}"
        );
    }
}
