//! PyTorch-made reference cases (see `tests/golden/`), compiled into the crate so
//! that `outproj check` and the tests can pin any backend to real PyTorch.
//! They were computed in float64 by `tests/golden/make_golden.py`.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::ops::{Activation, AttentionSpec, Backend, Cols, KeyPaddingMask, LossKind, Shaped};
use crate::projector::Projector;
use crate::signal::SignalPositions;
use crate::tensor::{compare, HostTensor};
use crate::verify::Comparison;
use crate::weights::{ProjectorWeights, Selection, TensorFile};

macro_rules! fixture {
    ($name:literal) => {
        (
            $name,
            include_bytes!(concat!("../tests/golden/", $name)) as &'static [u8],
        )
    };
}

const OPS: [(&str, &[u8]); 5] = [
    fixture!("linear.safetensors"),
    fixture!("layer_norm.safetensors"),
    fixture!("attention.safetensors"),
    fixture!("alignment_loss.safetensors"),
    fixture!("gather_signal_tokens.safetensors"),
];

const MODELS: [(&str, &[u8], &[u8]); 4] = [
    model!("legacy_prefixed"),
    model!("v15_audio_like"),
    model!("legacy_heads8_f16"),
    model!("legacy_b1"),
];

macro_rules! model {
    ($name:literal) => {
        (
            $name,
            include_bytes!(concat!(
                "../tests/golden/model_",
                $name,
                ".weights.safetensors"
            )) as &'static [u8],
            include_bytes!(concat!("../tests/golden/model_", $name, ".io.safetensors"))
                as &'static [u8],
        )
    };
}
use model;

/// Run every golden case on `be` and compare with PyTorch.
pub fn run_all<B: Backend>(be: &B) -> Result<Vec<Comparison>> {
    let mut out = Vec::new();
    for (name, bytes) in OPS {
        let file = TensorFile::from_static(name, bytes)?;
        for (case, params) in cases(&file)? {
            let op = name.trim_end_matches(".safetensors");
            run_op(be, &file, op, &case, &params, &mut out)?;
        }
    }
    for (name, weights, io) in MODELS {
        let (rel, max_abs) = run_model(be, weights, io)?;
        out.push(Comparison {
            op: "projector",
            case: name.to_string(),
            rel,
            max_abs,
        });
    }
    Ok(out)
}

fn cases(file: &TensorFile) -> Result<BTreeMap<String, serde_json::Value>> {
    let meta = file.metadata().cloned().unwrap_or_default();
    meta.into_iter()
        .map(|(k, v)| {
            let json = serde_json::from_str(&v)
                .map_err(|e| Error::invalid(format!("golden case {k}: bad metadata: {e}")))?;
            Ok((k, json))
        })
        .collect()
}

fn param<'a>(p: &'a serde_json::Value, key: &str) -> Result<&'a serde_json::Value> {
    p.get(key)
        .ok_or_else(|| Error::invalid(format!("golden metadata lacks `{key}`")))
}

fn uint(p: &serde_json::Value, key: &str) -> Result<usize> {
    param(p, key)?
        .as_u64()
        .map(|v| v as usize)
        .ok_or_else(|| Error::invalid(format!("golden metadata `{key}` is not an integer")))
}

fn record<B: Backend>(
    be: &B,
    op: &'static str,
    case: String,
    got: &B::Tensor,
    want: &HostTensor,
    out: &mut Vec<Comparison>,
) -> Result<()> {
    let got = be.download(got)?;
    let (rel, max_abs) = if got.shape() == want.shape() {
        compare(&got.to_f64_vec(), &want.to_f64_vec())
    } else {
        (f64::INFINITY, f64::INFINITY)
    };
    out.push(Comparison {
        op,
        case,
        rel,
        max_abs,
    });
    Ok(())
}

fn run_op<B: Backend>(
    be: &B,
    file: &TensorFile,
    op: &str,
    case: &str,
    p: &serde_json::Value,
    out: &mut Vec<Comparison>,
) -> Result<()> {
    let key = |field: &str| format!("{case}.{field}");
    let get = |field: &str| file.get(&key(field));
    let up = |field: &str| be.upload(&get(field)?);
    let opt = |field: &str| -> Result<Option<B::Tensor>> {
        if file.contains(&key(field)) {
            Ok(Some(up(field)?))
        } else {
            Ok(None)
        }
    };
    match op {
        "linear" => {
            let act = Activation::parse(param(p, "act")?.as_str().unwrap_or(""))?;
            let want = get("y")?;
            let mut y = be.alloc(want.shape())?;
            let (b, r) = (opt("b")?, opt("residual")?);
            be.linear(&up("x")?, &up("w")?, b.as_ref(), act, r.as_ref(), &mut y)?;
            record(be, "linear", key("y"), &y, &want, out)
        }
        "layer_norm" => {
            let eps = param(p, "eps")?.as_f64().unwrap_or(f64::NAN);
            let want = get("y")?;
            let mut y = be.alloc(want.shape())?;
            let r = opt("residual")?;
            let mut sum = match &r {
                Some(_) => Some(be.alloc(want.shape())?),
                None => None,
            };
            let (w, b) = (up("weight")?, up("bias")?);
            be.layer_norm(&up("x")?, r.as_ref(), &w, &b, eps, &mut y, sum.as_mut())?;
            record(be, "layer_norm", key("y"), &y, &want, out)?;
            if let Some(s) = &sum {
                record(be, "layer_norm", key("sum"), s, &get("sum")?, out)?;
            }
            Ok(())
        }
        "attention" => {
            let mut spec = AttentionSpec::new(uint(p, "heads")?, uint(p, "head_dim")?);
            spec.causal = param(p, "causal")?.as_bool().unwrap_or(false);
            let (q, k, v) = (up("q_src")?, up("k_src")?, up("v_src")?);
            let mask = if file.contains(&key("mask")) {
                let (shape, ids) = file.get_ids(&key("mask"))?;
                let m = KeyPaddingMask::new(
                    shape.first().copied().unwrap_or(0),
                    shape.get(1).copied().unwrap_or(0),
                    ids.iter().map(|&x| x != 0).collect(),
                )?;
                Some(be.upload_mask(&m)?)
            } else {
                None
            };
            let want = get("out")?;
            let mut o = be.alloc(want.shape())?;
            be.attention(
                Cols::new(&q, uint(p, "q_start")?),
                Cols::new(&k, uint(p, "k_start")?),
                Cols::new(&v, uint(p, "v_start")?),
                &spec,
                mask.as_ref(),
                &mut o,
            )?;
            record(be, "attention", key("out"), &o, &want, out)
        }
        "alignment_loss" => {
            let (pred, target) = (up("pred")?, up("target")?);
            for (kind, name) in [(LossKind::TokenL2, "l2"), (LossKind::Mse, "mse")] {
                let mut loss = be.alloc(&[1])?;
                let mut grad = be.alloc(pred.shape())?;
                be.alignment_loss(kind, &pred, &target, &mut loss, &mut grad)?;
                let l = format!("{name}_loss");
                record(be, "alignment_loss", key(&l), &loss, &get(&l)?, out)?;
                let g = format!("{name}_grad");
                record(be, "alignment_loss", key(&g), &grad, &get(&g)?, out)?;
            }
            Ok(())
        }
        "gather_signal_tokens" => {
            let hidden = up("hidden")?;
            let (ids_shape, ids) = file.get_ids(&key("token_ids"))?;
            let (_, signal) = file.get_ids(&key("signal_ids"))?;
            let (batch, seq) = (
                ids_shape.first().copied().unwrap_or(0),
                ids_shape.get(1).copied().unwrap_or(0),
            );
            let pos = SignalPositions::find(&ids, batch, seq, &signal)?;
            let want = get("out")?;
            let mut o = be.alloc(want.shape())?;
            be.gather_signal_tokens(&hidden, Some(&up("embeds")?), &pos, &mut o)?;
            record(be, "gather_signal_tokens", key("out"), &o, &want, out)
        }
        other => Err(Error::invalid(format!("no golden runner for op `{other}`"))),
    }
}

fn run_model<B: Backend>(be: &B, weights: &'static [u8], io: &'static [u8]) -> Result<(f64, f64)> {
    let wf = TensorFile::from_static("golden weights", weights)?;
    let io = TensorFile::from_static("golden io", io)?;
    let meta = wf
        .metadata()
        .and_then(|m| m.get("config"))
        .ok_or_else(|| Error::invalid("golden weights lack `config` metadata"))?;
    let config: serde_json::Value =
        serde_json::from_str(meta).map_err(|e| Error::invalid(format!("golden config: {e}")))?;
    // The prefix and variant are left to auto-detection; only the head count,
    // which the shapes cannot tell, is given.
    let sel = Selection {
        heads: Some(uint(&config, "heads")?),
        ..Selection::default()
    };
    let w = ProjectorWeights::load(&wf, &sel)?;
    let proj = Projector::new(be.clone(), &w)?;
    let hidden = be.upload(&io.get("hidden")?)?;
    let embeds = be.upload(&io.get("embeds")?)?;
    let y = proj.forward(&hidden, Some(&embeds))?;
    let got = be.download(&y)?;
    let want = io.get("conditioning")?;
    if got.shape() != want.shape() {
        return Ok((f64::INFINITY, f64::INFINITY));
    }
    Ok(compare(&got.to_f64_vec(), &want.to_f64_vec()))
}
