//! Checkpoints: [`TensorFile`] reads tensors (f64, f32, f16, bf16) from safetensors,
//! PyTorch's `torch.save` files and sharded checkpoints' indexes, with checks that
//! name the key; [`ProjectorWeights`] holds one projector's weights under PyTorch's
//! exact state-dict names.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use safetensors::tensor::Dtype;

use crate::config::{Modality, ProjectorConfig, Variant};
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::tensor::{try_filled, DType, HostTensor};

mod file;
mod torch;

pub use file::TensorFile;

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
        Self::random_with(config, modality, seed, false)
    }

    /// [`random`](Self::random), but with every LayerNorm's gain and shift
    /// and every attention bias drawn too, each tensor its own (gains
    /// `1 + 0.2 N(0, 1)`, shifts and biases `0.1 N(0, 1)`), as in a trained
    /// checkpoint. At their initial 1 and 0 a norm's or bias's parameters
    /// applied in the wrong place, or not at all, change nothing: comparisons
    /// of whole projectors draw these.
    pub fn random_trained(
        config: ProjectorConfig,
        modality: Option<Modality>,
        seed: u64,
    ) -> Result<Self> {
        Self::random_with(config, modality, seed, true)
    }

    fn random_with(
        config: ProjectorConfig,
        modality: Option<Modality>,
        seed: u64,
        trained: bool,
    ) -> Result<Self> {
        config.validate()?;
        let mut rng = Rng::new(seed);
        // A norm's or an attention bias's initial value, or for a trained
        // one that value plus `scale` N(0, 1), drawn from a stream of its own
        // so that every other tensor is `random`'s.
        let mut trained_rng = Rng::new(seed ^ 0x7261_696e_6564);
        let mut draw_about = |data: &mut [f64], init: f64, scale: f64| {
            if trained {
                trained_rng.fill_normal(data);
                data.iter_mut().for_each(|v| *v = init + scale * *v);
            } else {
                data.fill(init);
            }
        };
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
                let (init, scale) = if param == "weight" {
                    (1.0, 0.2)
                } else {
                    (0.0, 0.1)
                };
                draw_about(&mut data, init, scale);
            } else if param == "in_proj_bias" || module.ends_with("out_proj") && param == "bias" {
                draw_about(&mut data, 0.0, 0.1);
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
    ///
    /// ```
    /// use output_projector::config::Modality;
    /// use output_projector::cpu::Cpu;
    /// use output_projector::ops::Backend;
    /// use output_projector::projector::Projector;
    /// use output_projector::weights::{ProjectorWeights, Selection, TensorFile};
    ///
    /// # fn main() -> output_projector::Result<()> {
    /// // A small video projector saved by `torch.save`, as NExT-GPT saves its
    /// // own, and an input with PyTorch's float64 output for it.
    /// let file = TensorFile::open("tests/golden/torch_legacy_b1.pt")?;
    /// let weights = ProjectorWeights::load(&file, &Selection::default())?;
    /// let io = TensorFile::open("tests/golden/model_legacy_b1.io.safetensors")?;
    ///
    /// let projector = Projector::new(Cpu::open()?, &weights)?;
    /// let be = projector.backend();
    /// let hidden = be.upload(&io.get("hidden")?)?;
    /// let embeds = be.upload(&io.get("embeds")?)?;
    /// let ours = be.download(&projector.forward(&hidden, Some(&embeds))?)?;
    /// let torch = io.get("conditioning")?;
    /// let (rel, _) = output_projector::tensor::compare(&ours.to_f64_vec(), &torch.to_f64_vec());
    /// assert!(rel < 1e-5, "relative error {rel}");
    ///
    /// // Asking for a projector the file does not hold is an error that says so.
    /// let audio = Selection { modality: Some(Modality::Audio), ..Selection::default() };
    /// assert!(ProjectorWeights::load(&file, &audio).is_err());
    /// # Ok(())
    /// # }
    /// ```
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

    /// `random_trained` draws each norm's gain and shift and each attention
    /// bias, no two alike and none at its initial value; every other tensor
    /// is the same as `random`'s.
    #[test]
    fn trained_weights_draw_the_norms_and_attention_biases() -> Result<()> {
        let config = ProjectorConfig {
            in_dim: 8,
            d_model: 8,
            heads: 2,
            ffn_dim: 8,
            encoder_layers: 2,
            decoder_layers: 2,
            ..ProjectorConfig::preset(Modality::Image, Variant::Legacy)
        };
        let init = ProjectorWeights::random(config.clone(), None, 3)?;
        let trained = ProjectorWeights::random_trained(config, None, 3)?;
        let mut drawn = Vec::new();
        for (name, t) in init.tensors() {
            let (a, b) = (t.to_f64_vec(), trained.get(name)?.to_f64_vec());
            let (module, param) = name.rsplit_once('.').unwrap_or(("", name));
            let is_norm = module.ends_with("norm") || module.contains(".norm");
            let is_attention_bias =
                param == "in_proj_bias" || module.ends_with("out_proj") && param == "bias";
            if is_norm || is_attention_bias {
                assert!(a.iter().zip(&b).all(|(x, y)| x != y), "{name}: {b:?}");
                drawn.push(b);
            } else {
                assert_eq!(a, b, "{name}");
            }
        }
        // norm1/norm2 (x2), the encoder's norm; norm1..3 (x2), the decoder's;
        // weight and bias each; and 2 biases per attention, 3 of them a layer.
        assert_eq!(drawn.len(), 2 * (2 * 2 + 1 + 2 * 3 + 1) + 2 * 3 * 2);
        for (i, a) in drawn.iter().enumerate() {
            assert!(drawn[..i].iter().all(|b| b != a), "drawn twice: {a:?}");
        }
        Ok(())
    }

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
        // A test fixture built just above: a panic here is the test failing.
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
