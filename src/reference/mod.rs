//! The CPU reference backend: naive loops over f64 tensors with f64 accumulation,
//! written for obviousness, not speed. It is the oracle every kernel is checked
//! against, and it shares no numerical code with the GPU backends.

mod alignment_loss;
mod attention;
mod gather_signal_tokens;
mod layer_norm;
mod linear;

use crate::error::Result;
use crate::ops::{
    AbsorbedAttentionDims, AbsorbedAttentionInput, Activation, AttentionDims, AttentionSpec,
    Backend, Cols, GatherDims, KeyPaddingMask, LayerNormDims, LinearDims, LossDims, LossKind,
    NormAfter, NormInput, Shaped,
};
use crate::signal::SignalPositions;
use crate::tensor::{Dense, HostTensor};

/// A row-major f64 tensor in host memory.
pub type RefTensor = Dense<f64>;

/// The CPU reference backend.
#[derive(Clone, Copy, Debug, Default)]
pub struct Reference;

impl Backend for Reference {
    type Tensor = RefTensor;
    type Mask = KeyPaddingMask;

    fn name(&self) -> &str {
        "cpu"
    }

    fn upload(&self, t: &HostTensor) -> Result<RefTensor> {
        RefTensor::new(t.shape().to_vec(), t.to_f64_vec())
    }

    fn download(&self, t: &RefTensor) -> Result<HostTensor> {
        HostTensor::from_f64(t.shape.clone(), t.data.clone())
    }

    fn check_room(&self, elements: usize, what: &str) -> Result<()> {
        crate::tensor::check_room(elements, std::mem::size_of::<f64>(), what)
    }

    fn alloc(&self, shape: &[usize]) -> Result<RefTensor> {
        // NaN, so that an element no op writes can never pass as a result.
        RefTensor::filled(shape, f64::NAN)
    }

    fn upload_mask(&self, mask: &KeyPaddingMask) -> Result<KeyPaddingMask> {
        Ok(mask.clone())
    }

    fn linear(
        &self,
        x: &RefTensor,
        w: &RefTensor,
        b: Option<&RefTensor>,
        act: Activation,
        residual: Option<&RefTensor>,
        out: &mut RefTensor,
    ) -> Result<()> {
        let d = LinearDims::check(
            &x.shape,
            &w.shape,
            b.map(|t| t.shape()),
            residual.map(|t| t.shape()),
            &out.shape,
        )?;
        linear::linear(
            d,
            &x.data,
            &w.data,
            b.map(|t| t.data()),
            act,
            residual.map(|t| t.data()),
            &mut out.data,
        );
        Ok(())
    }

    fn layer_norm(
        &self,
        x: &RefTensor,
        residual: Option<&RefTensor>,
        weight: &RefTensor,
        bias: &RefTensor,
        eps: f64,
        out: &mut RefTensor,
        sum_out: Option<&mut RefTensor>,
    ) -> Result<()> {
        let d = LayerNormDims::check(
            &x.shape,
            residual.map(|t| t.shape()),
            &weight.shape,
            &bias.shape,
            eps,
            &out.shape,
            sum_out.as_ref().map(|t| t.shape()),
        )?;
        layer_norm::layer_norm(
            d,
            &x.data,
            residual.map(|t| t.data()),
            &weight.data,
            &bias.data,
            eps,
            &mut out.data,
            sum_out.map(|t| t.data_mut()),
        );
        Ok(())
    }

    fn attention(
        &self,
        q: Cols<'_, RefTensor>,
        k: Cols<'_, RefTensor>,
        v: Cols<'_, RefTensor>,
        spec: &AttentionSpec,
        mask: Option<&KeyPaddingMask>,
        out: &mut RefTensor,
    ) -> Result<()> {
        let d = AttentionDims::check(
            (&q.tensor.shape, q.start),
            (&k.tensor.shape, k.start),
            (&v.tensor.shape, v.start),
            spec,
            mask.map(|m| (m.batch(), m.keys())),
            &out.shape,
        )?;
        attention::attention(
            d,
            &q.tensor.data,
            &k.tensor.data,
            &v.tensor.data,
            spec.scale(),
            spec.causal,
            mask.map(|m| m.ignore()),
            &mut out.data,
        );
        Ok(())
    }

    fn attention_absorbed(
        &self,
        norm: NormInput<'_, RefTensor>,
        attn: AbsorbedAttentionInput<'_, RefTensor>,
        after: NormAfter<'_, RefTensor>,
        stream_out: &mut RefTensor,
        out: &mut RefTensor,
    ) -> Result<()> {
        let d = AbsorbedAttentionDims::check(&norm, &attn, &after, &stream_out.shape, &out.shape)?;
        let t = attention::Absorbed {
            x: &norm.x.data,
            residual: norm.residual.map(|r| r.data()),
            norm: [&norm.weight.data, &norm.bias.data],
            eps: norm.eps,
            keys: &attn.keys.tensor.data,
            values: &attn.values.tensor.data,
            key_bias: &attn.key_bias.tensor.data,
            out_bias: &attn.out_bias.data,
            scale: attn.scale,
            after: [&after.weight.data, &after.bias.data],
            after_eps: after.eps,
        };
        attention::attention_absorbed(d, t, &mut stream_out.data, &mut out.data);
        Ok(())
    }

    fn alignment_loss(
        &self,
        kind: LossKind,
        pred: &RefTensor,
        target: &RefTensor,
        loss: &mut RefTensor,
        grad: &mut RefTensor,
    ) -> Result<()> {
        let d = LossDims::check(&pred.shape, &target.shape, &loss.shape, &grad.shape)?;
        loss.data[0] =
            alignment_loss::alignment_loss(d, kind, &pred.data, &target.data, &mut grad.data);
        Ok(())
    }

    fn gather_signal_tokens(
        &self,
        hidden: &RefTensor,
        embeds: Option<&RefTensor>,
        positions: &SignalPositions,
        out: &mut RefTensor,
    ) -> Result<()> {
        let d = GatherDims::check(
            &hidden.shape,
            embeds.map(|t| t.shape()),
            positions,
            &out.shape,
        )?;
        gather_signal_tokens::gather_signal_tokens(
            d,
            &hidden.data,
            embeds.map(|t| t.data()),
            positions.positions(),
            &mut out.data,
        );
        Ok(())
    }
}
