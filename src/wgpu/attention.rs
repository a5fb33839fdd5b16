//! Multi-head attention on wgpu (`shaders/attention.wgsl`): the naive v1 kernel,
//! the flash kernel with K/V tiles in workgroup memory, and a flash kernel that
//! shares K/V between the invocations of a subgroup instead. All read Q, K, V in
//! place as column blocks.
//!
//! The shader file holds two modules: a common head, then the part marked
//! `//! plain:` (any device, any alignment) and the part marked `//! subgroup:`
//! (subgroup builtins, vec4 bindings). A device without SUBGROUP rejects a
//! module that merely mentions a subgroup builtin, so each part is compiled
//! with the common head alone.

use std::sync::OnceLock;

use super::backend::{Bind, Kernel, KernelVersion, Wgpu, WgpuMask, WgpuTensor};
use crate::error::{Error, Result};
use crate::ops::{f32_param, AttentionDims, AttentionSpec};

const SOURCE: &str = include_str!("../../shaders/attention.wgsl");
// At the start of a line: the head also names them in passing.
const PLAIN_MARK: &str = "\n//! plain:";
const SUBGROUP_MARK: &str = "\n//! subgroup:";

/// (plain module, subgroup module), each the common head plus its part.
fn sources() -> &'static (String, String) {
    static SOURCES: OnceLock<(String, String)> = OnceLock::new();
    SOURCES.get_or_init(|| {
        let split = SOURCE.split_once(PLAIN_MARK).and_then(|(head, rest)| {
            let (plain, subgroup) = rest.split_once(SUBGROUP_MARK)?;
            Some((
                format!("{head}{PLAIN_MARK}{plain}"),
                format!("{head}{SUBGROUP_MARK}{subgroup}"),
            ))
        });
        // Without the marks (an edited file), the whole file serves both: it
        // then compiles only where SUBGROUP is available, and says so in the error.
        split.unwrap_or_else(|| (SOURCE.to_string(), SOURCE.to_string()))
    })
}

fn plain(entry: &'static str) -> Kernel {
    Kernel {
        shader: "attention.wgsl",
        source: sources().0.as_str(),
        entry,
        // q, k, v, mask words
        reads: 4,
        writes: 1,
        weight: None,
    }
}

fn subgroup(entry: &'static str) -> Kernel {
    Kernel {
        source: sources().1.as_str(),
        ..plain(entry)
    }
}

/// Every kernel of this op (for the translation tests).
#[cfg(test)]
pub(super) fn kernels() -> Vec<Kernel> {
    let plain = ["attention_v1", "attention_d64", "attention"].map(plain);
    let subgroup = ["attention_sg_d64", "attention_sg"].map(subgroup);
    plain.into_iter().chain(subgroup).collect()
}

/// Invocations per workgroup of v1 (`V1_WG` in the shader).
const V1_WG: usize = 64;
/// Queries per workgroup of the workgroup-memory flash kernel (`BQ`).
const FLASH_BQ: usize = 16;
/// Queries per workgroup of the subgroup flash kernel (`SG_WG`).
const SG_BQ: usize = 16;
/// Keys the subgroup kernel loads per block, one per lane (`SG_KEYS`).
const SG_KEYS: u32 = 8;
/// Largest head dim of the flash kernels, and of their shorter `_d64` forms.
const FLASH_MAX_HD: usize = 128;
const FLASH_D64_MAX_HD: usize = 64;

wgsl_params! {
    shader: "attention.wgsl",
    /// Must match `Params` in the shader.
    struct Params {
        batch: u32,
        lq: u32,
        lk: u32,
        heads: u32,
        head_dim: u32,
        q_stride: u32,
        k_stride: u32,
        v_stride: u32,
        q_start: u32,
        k_start: u32,
        v_start: u32,
        causal: u32,
        has_mask: u32,
        scale_log2: f32,
        row_stride: u32,
        q_tiles: u32,
    }
}

pub(super) fn overflow(what: &str) -> Error {
    Error::Overflow(format!("wgpu attention: {what}"))
}

/// `a * b`, or an overflow error naming `what`.
pub(super) fn mul(a: usize, b: usize, what: &str) -> Result<usize> {
    a.checked_mul(b).ok_or_else(|| overflow(what))
}

/// Which kernel runs a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    V1,
    Flash,
    Subgroup,
}

fn choose(be: &Wgpu, d: &AttentionDims) -> Path {
    if be.version() == KernelVersion::Naive || d.head_dim > FLASH_MAX_HD {
        return Path::V1;
    }
    let gpu = be.gpu();
    // Every lane's vec4 of a row must start on a vec4 boundary, and lanes
    // 0..SG_KEYS of one subgroup must exist.
    let aligned = [
        d.head_dim, d.q_stride, d.k_stride, d.v_stride, d.q_start, d.k_start, d.v_start,
    ]
    .iter()
    .all(|x| x % 4 == 0);
    if aligned
        && gpu.features.contains(::wgpu::Features::SUBGROUP)
        && gpu.info.subgroup_min_size >= SG_KEYS
    {
        Path::Subgroup
    } else {
        Path::Flash
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn attention(
    be: &Wgpu,
    d: AttentionDims,
    q: &WgpuTensor,
    k: &WgpuTensor,
    v: &WgpuTensor,
    spec: &AttentionSpec,
    mask: Option<&WgpuMask>,
    out: &mut WgpuTensor,
) -> Result<()> {
    // The shaders index with u32: every element index they form is below the
    // element count of the tensor it reads (rows * stride), of the output, of
    // the mask, or of the flattened (b, h, query) work items, so those must fit.
    super::u32_of(mul(mul(d.batch, d.lq, "q rows")?, d.q_stride, "q")?)?;
    super::u32_of(mul(mul(d.batch, d.lk, "k rows")?, d.k_stride, "k")?)?;
    super::u32_of(mul(mul(d.batch, d.lk, "v rows")?, d.v_stride, "v")?)?;
    let inner = mul(d.heads, d.head_dim, "heads * head_dim")?;
    super::u32_of(mul(mul(d.batch, d.lq, "out rows")?, inner, "out")?)?;
    super::u32_of(mul(d.batch, d.lk, "mask")?)?;
    let queries = mul(mul(d.batch, d.heads, "batch * heads")?, d.lq, "queries")?;
    super::u32_of(queries)?;

    let path = choose(be, &d);
    let small = d.head_dim <= FLASH_D64_MAX_HD;
    let (kernel, bq) = match path {
        Path::V1 => (plain("attention_v1"), 0),
        Path::Flash if small => (plain("attention_d64"), FLASH_BQ),
        Path::Flash => (plain("attention"), FLASH_BQ),
        Path::Subgroup if small => (subgroup("attention_sg_d64"), SG_BQ),
        Path::Subgroup => (subgroup("attention_sg"), SG_BQ),
    };
    // v1 recovers its invocation index, the flash kernels their workgroup
    // index, from a 2D grid as x + y * row_stride.
    let (groups, row_stride, q_tiles) = if path == Path::V1 {
        let groups = be.grid(queries.div_ceil(V1_WG))?;
        let row_stride = groups[0]
            .checked_mul(V1_WG as u32)
            .ok_or_else(|| overflow("v1 grid"))?;
        (groups, row_stride, 0)
    } else {
        let q_tiles = d.lq.div_ceil(bq);
        // Query indices of the last tile run up to q_tiles * bq.
        super::u32_of(mul(q_tiles, bq, "query tiles")?)?;
        let n = mul(
            mul(d.batch, d.heads, "batch * heads")?,
            q_tiles,
            "workgroups",
        )?;
        let groups = be.grid(n)?;
        (groups, groups[0], q_tiles)
    };

    let params = Params {
        batch: super::u32_of(d.batch)?,
        lq: super::u32_of(d.lq)?,
        lk: super::u32_of(d.lk)?,
        heads: super::u32_of(d.heads)?,
        head_dim: super::u32_of(d.head_dim)?,
        q_stride: super::u32_of(d.q_stride)?,
        k_stride: super::u32_of(d.k_stride)?,
        v_stride: super::u32_of(d.v_stride)?,
        q_start: super::u32_of(d.q_start)?,
        k_start: super::u32_of(d.k_start)?,
        v_start: super::u32_of(d.v_start)?,
        causal: u32::from(spec.causal),
        has_mask: u32::from(mask.is_some()),
        // Scores in the log2 domain: softmax(x) = exp2(x log2 e - max) / sum.
        scale_log2: f32_param(
            "wgpu attention: scale x log2(e)",
            spec.scale() * std::f64::consts::LOG2_E,
        )?,
        row_stride,
        q_tiles: super::u32_of(q_tiles)?,
    };
    let mask = mask.map_or(Bind::Unused, |m| Bind::Words(m.words()));
    be.dispatch(
        &kernel,
        &params,
        &[q.into(), k.into(), v.into(), mask],
        &[out],
        groups,
    )
}

#[cfg(test)]
mod tests {
    use super::sources;

    #[test]
    fn the_plain_module_leaves_out_the_subgroup_part() {
        let (plain, subgroup) = sources();
        for builtin in [
            "subgroupBroadcast(",
            "subgroupBallot(",
            "subgroup_invocation_id)",
        ] {
            assert!(!plain.contains(builtin), "plain module uses {builtin}");
            assert!(
                subgroup.contains(builtin),
                "subgroup module lacks {builtin}"
            );
        }
        for entry in ["fn attention_v1(", "fn attention(", "fn attention_d64("] {
            assert!(
                plain.contains(entry) && !subgroup.contains(entry),
                "{entry}"
            );
        }
        for entry in ["fn attention_sg(", "fn attention_sg_d64("] {
            assert!(
                subgroup.contains(entry) && !plain.contains(entry),
                "{entry}"
            );
        }
        // Both carry the common head (parameters, mask binding).
        assert!(plain.contains("struct Params") && subgroup.contains("struct Params"));
    }
}
