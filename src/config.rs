//! The projector's hyper-parameters, NExT-GPT's presets and checkpoint layouts.

use crate::error::{Error, Result};
use crate::tensor::checked_numel;

/// Most layers a config's encoder or decoder may have (NExT-GPT's have 4): a
/// bound that keeps a config read from a file from asking for billions of
/// parameter names before anything else is checked.
pub const MAX_LAYERS: usize = 4096;

/// Which of NExT-GPT's code bases named the weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Variant {
    /// The released model: `fc`, `tfm`, `model`, `query_embs`.
    Legacy,
    /// The v1.5 rewrite: `in_fc`, `tfm`, `out_fc`, `query_embs`.
    V15,
}

impl Variant {
    /// The name messages print and `parse` accepts: `"legacy"` or `"v1.5"`.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Legacy => "legacy",
            Variant::V15 => "v1.5",
        }
    }

    /// Parses `"legacy"`, `"v1.5"` or `"v15"`; anything else is [`Error::Invalid`].
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "legacy" => Ok(Variant::Legacy),
            "v1.5" | "v15" => Ok(Variant::V15),
            _ => Err(Error::invalid(format!(
                "unknown variant `{s}` (expected legacy or v1.5)"
            ))),
        }
    }

    /// Name of the input linear layer (LLM hidden size -> d_model).
    pub fn input_linear(self) -> &'static str {
        match self {
            Variant::Legacy => "fc",
            Variant::V15 => "in_fc",
        }
    }

    /// Name of the output linear layer (d_model -> conditioning width).
    pub fn output_linear(self) -> &'static str {
        match self {
            Variant::Legacy => "model",
            Variant::V15 => "out_fc",
        }
    }

    /// Both variants, legacy first.
    pub const ALL: [Variant; 2] = [Variant::Legacy, Variant::V15];
}

/// The three projectors of NExT-GPT.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Modality {
    /// Image projector (`[IMG0]..` tokens): 77 x 768 out (legacy, Stable Diffusion's
    /// CLIP states) or 77 x 1024 (v1.5).
    Image,
    /// Video projector (`[VID0]..` tokens) for Zeroscope: 77 x 1024 out.
    Video,
    /// Audio projector (`[AUD0]..` tokens) for AudioLDM: 1 x 512 out (a CLAP embedding).
    Audio,
}

impl Modality {
    /// The modality's name as `parse` accepts it: `"image"`, `"video"` or `"audio"`.
    pub fn name(self) -> &'static str {
        match self {
            Modality::Image => "image",
            Modality::Video => "video",
            Modality::Audio => "audio",
        }
    }

    /// Parses `"image"`, `"video"` or `"audio"`; anything else is [`Error::Invalid`].
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "image" => Ok(Modality::Image),
            "video" => Ok(Modality::Video),
            "audio" => Ok(Modality::Audio),
            _ => Err(Error::invalid(format!(
                "unknown modality `{s}` (expected image, video or audio)"
            ))),
        }
    }

    /// All three modalities: image, video, audio.
    pub const ALL: [Modality; 3] = [Modality::Image, Modality::Video, Modality::Audio];

    /// The state-dict prefix of this projector inside a full NExT-GPT checkpoint.
    pub fn checkpoint_prefix(self, variant: Variant) -> &'static str {
        match (variant, self) {
            (Variant::Legacy, Modality::Image) => "gen_text_hidden_fcs.0.",
            (Variant::Legacy, Modality::Video) => "gen_text_hidden_fcs_video.0.",
            (Variant::Legacy, Modality::Audio) => "gen_text_hidden_fcs_audio.0.",
            (Variant::V15, Modality::Image) => "model.mm_output_img_projector.",
            (Variant::V15, Modality::Video) => "model.mm_output_vid_projector.",
            (Variant::V15, Modality::Audio) => "model.mm_output_aud_projector.",
        }
    }

    /// Whether `prefix` is this projector's checkpoint prefix, alone or under the
    /// prefix of a wrapper (DeepSpeed's `module.`, PEFT's `base_model.model.`):
    /// `module.gen_text_hidden_fcs.0.` is the legacy image projector's.
    pub fn is_prefix(self, variant: Variant, prefix: &str) -> bool {
        let own = self.checkpoint_prefix(variant);
        prefix
            .strip_suffix(own)
            .is_some_and(|wrapper| wrapper.is_empty() || wrapper.ends_with('.'))
    }

    /// The modality and variant whose checkpoint prefix `prefix` is (see
    /// [`is_prefix`](Self::is_prefix)), if any.
    pub fn from_prefix(prefix: &str) -> Option<(Modality, Variant)> {
        Variant::ALL.iter().find_map(|&v| {
            Modality::ALL
                .iter()
                .find(|m| m.is_prefix(v, prefix))
                .map(|&m| (m, v))
        })
    }
}

/// Everything that fixes the projector's shapes.
#[derive(Clone, Debug, PartialEq)]
pub struct ProjectorConfig {
    /// Which code base's parameter names (`fc`/`model` or `in_fc`/`out_fc`) the weights use.
    pub variant: Variant,
    /// LLM hidden size (4096 for Vicuna-7B).
    pub in_dim: usize,
    /// Transformer width `E`: output of the input linear, width of the queries (512 in
    /// every preset).
    pub d_model: usize,
    /// Attention heads per MHA (4 in every preset); head dim is `d_model / heads`.
    pub heads: usize,
    /// Hidden width of each layer's FFN, `linear1` output (2048 in every preset).
    pub ffn_dim: usize,
    /// Number of pre-LayerNorm encoder layers (4 in every preset).
    pub encoder_layers: usize,
    /// Number of pre-LayerNorm decoder layers (4 in every preset).
    pub decoder_layers: usize,
    /// Learned queries: tokens of conditioning produced (77, or 1 for audio).
    pub n_out: usize,
    /// Width of each output token, the diffusion model's conditioning width: 768 or 1024
    /// (CLIP hidden states) or 512 (the CLAP embedding).
    pub out_dim: usize,
    /// Signal tokens per sequence, `Some` for a preset: the projector then rejects any
    /// other count. `None` accepts any number (the Transformer itself has no fixed length).
    pub n_in: Option<usize>,
    /// LayerNorm epsilon, added to the biased variance (1e-5, PyTorch's default).
    pub eps: f64,
}

impl ProjectorConfig {
    /// One of NExT-GPT's six projectors.
    pub fn preset(modality: Modality, variant: Variant) -> Self {
        let (n_in, n_out, out_dim) = match (variant, modality) {
            (Variant::Legacy, Modality::Image) => (4, 77, 768),
            (Variant::Legacy, Modality::Video) => (24, 77, 1024),
            (Variant::Legacy, Modality::Audio) => (8, 1, 512),
            (Variant::V15, Modality::Image) => (7, 77, 1024),
            (Variant::V15, Modality::Video) => (47, 77, 1024),
            (Variant::V15, Modality::Audio) => (15, 1, 512),
        };
        ProjectorConfig {
            variant,
            in_dim: 4096,
            d_model: 512,
            heads: 4,
            ffn_dim: 2048,
            encoder_layers: 4,
            decoder_layers: 4,
            n_out,
            out_dim,
            n_in: Some(n_in),
            eps: 1e-5,
        }
    }

    /// Width of one attention head, `d_model / heads` (128 for the presets).
    pub fn head_dim(&self) -> usize {
        self.d_model / self.heads.max(1)
    }

    /// Checks that the numbers make a valid projector.
    pub fn validate(&self) -> Result<()> {
        let dims = [
            ("in_dim", self.in_dim),
            ("d_model", self.d_model),
            ("heads", self.heads),
            ("ffn_dim", self.ffn_dim),
            ("encoder_layers", self.encoder_layers),
            ("decoder_layers", self.decoder_layers),
            ("n_out", self.n_out),
            ("out_dim", self.out_dim),
        ];
        for (name, v) in dims {
            if v == 0 {
                return Err(Error::invalid(format!("config: {name} must be at least 1")));
            }
        }
        if self.n_in == Some(0) {
            return Err(Error::invalid("config: n_in must be at least 1"));
        }
        self.parameter_count()?;
        if !self.d_model.is_multiple_of(self.heads) {
            return Err(Error::invalid(format!(
                "config: d_model {} is not divisible by {} heads",
                self.d_model, self.heads
            )));
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(Error::invalid(format!(
                "config: eps {} must be > 0",
                self.eps
            )));
        }
        Ok(())
    }

    /// Number of parameters; an error where a stack has more than
    /// [`MAX_LAYERS`] layers or a tensor's size or the total overflows `usize`.
    pub fn parameter_count(&self) -> Result<usize> {
        for (name, layers) in [
            ("encoder_layers", self.encoder_layers),
            ("decoder_layers", self.decoder_layers),
        ] {
            if layers > MAX_LAYERS {
                return Err(Error::invalid(format!(
                    "config: {name} {layers} is more than {MAX_LAYERS}"
                )));
            }
        }
        crate::weights::layout(self)
            .iter()
            .try_fold(0usize, |total, (name, shape)| {
                total
                    .checked_add(checked_numel(shape, name)?)
                    .ok_or_else(|| {
                        Error::Overflow(format!("config: the parameter count of {self:?}"))
                    })
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preset_parameter_counts_match_spec() {
        let count = |m| {
            ProjectorConfig::preset(m, Variant::Legacy)
                .parameter_count()
                .unwrap()
        };
        assert_eq!(count(Modality::Image), 31_958_784);
        assert_eq!(count(Modality::Video), 32_090_112);
        assert_eq!(count(Modality::Audio), 31_788_544);
    }

    #[test]
    fn prefixes_round_trip() {
        for v in Variant::ALL {
            for m in Modality::ALL {
                assert_eq!(Modality::from_prefix(m.checkpoint_prefix(v)), Some((m, v)));
            }
        }
        assert_eq!(Modality::from_prefix(""), None);
        let wrapped = Modality::from_prefix("module.gen_text_hidden_fcs_audio.0.");
        assert_eq!(wrapped, Some((Modality::Audio, Variant::Legacy)));
        let wrapped = Modality::from_prefix("base_model.model.mm_output_vid_projector.");
        assert_eq!(wrapped, Some((Modality::Video, Variant::V15)));
        assert_eq!(Modality::from_prefix("xgen_text_hidden_fcs.0."), None);
        assert_eq!(Modality::from_prefix("gen_text_hidden_fcs.0.x."), None);
    }

    #[test]
    fn configs_too_large_to_count_are_errors() {
        let image = ProjectorConfig::preset(Modality::Image, Variant::Legacy);
        let wide = ProjectorConfig {
            d_model: 1 << 62,
            ..image.clone()
        };
        assert!(matches!(wide.validate(), Err(Error::Overflow(_))));
        let deep = ProjectorConfig {
            encoder_layers: 1 << 40,
            ..image.clone()
        };
        let e = deep.validate().unwrap_err().to_string();
        assert!(
            e.contains("encoder_layers 1099511627776 is more than 4096"),
            "{e}"
        );
        assert!(deep.parameter_count().is_err());
        let most = ProjectorConfig {
            decoder_layers: MAX_LAYERS,
            ..image
        };
        most.validate().unwrap();
    }
}
