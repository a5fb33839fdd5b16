//! Host-side tensors: what files hold and what backends upload from and download to.

use crate::error::{Error, Result};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// Element types accepted in files and on the host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary64; what the CPU reference computes in.
    F64,
    /// IEEE binary32; the default.
    #[default]
    F32,
    /// IEEE binary16 (the released checkpoint's storage type).
    F16,
    /// bfloat16: f32's exponent range, 8-bit significand.
    BF16,
}

impl DType {
    /// The short name the CLI takes and messages print: `f64`, `f32`, `f16` or `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            DType::F64 => "f64",
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// Machine epsilon: the gap between 1 and the next value of the type
    /// (2^-52, 2^-23, 2^-10, 2^-7). Rounding to the type moves a value by at
    /// most half of it, relative.
    pub fn epsilon(self) -> f64 {
        let mantissa_bits = match self {
            DType::F64 => 52,
            DType::F32 => 23,
            DType::F16 => 10,
            DType::BF16 => 7,
        };
        (-(mantissa_bits as f64)).exp2()
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F64 => 8,
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Parse a CLI name (`f64`, `f32`, `f16`, `bf16`) or PyTorch's long name
    /// (`float64`, `float32`, `float16`, `bfloat16`).
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f64" | "float64" => Ok(DType::F64),
            "f32" | "float32" => Ok(DType::F32),
            "f16" | "float16" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            _ => Err(Error::invalid(format!(
                "unknown dtype `{s}` (expected f64, f32, f16 or bf16)"
            ))),
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A host element type: its [`DType`], and conversions that round to nearest
/// even straight from f64 or f32 (one rounding, never two).
pub(crate) trait Element: bytemuck::Pod + Send + Sync {
    const DTYPE: DType;
    fn from_f64(x: f64) -> Self;
    fn from_f32(x: f32) -> Self;
    fn to_f64(self) -> f64;
    fn into_data(v: Vec<Self>) -> HostData;
}

macro_rules! element {
    ($t:ty, $dtype:ident, $from_f64:expr, $from_f32:expr, $to_f64:expr) => {
        impl Element for $t {
            const DTYPE: DType = DType::$dtype;
            fn from_f64(x: f64) -> Self {
                $from_f64(x)
            }
            fn from_f32(x: f32) -> Self {
                $from_f32(x)
            }
            fn to_f64(self) -> f64 {
                $to_f64(self)
            }
            fn into_data(v: Vec<Self>) -> HostData {
                HostData::$dtype(v)
            }
        }
    };
}

element!(f64, F64, |x| x, f64::from, |x| x);
element!(f32, F32, |x| x as f32, |x| x, f64::from);
// Not `half`'s `from_f64`: its f16 goes through a rounding to f32 where the
// CPU has F16C (two roundings), and its bf16 rounds on the f64's upper 32
// bits alone, so a value just past a midpoint can round the wrong way.
element!(
    f16,
    F16,
    |x| f16::from_f32(to_f32_odd(x)),
    f16::from_f32,
    f16::to_f64
);
element!(
    bf16,
    BF16,
    |x| bf16::from_f32(to_f32_odd(x)),
    bf16::from_f32,
    bf16::to_f64
);

/// A vector of `v.len()` zeros of `O`, filled by `fill(v, out)`: a slice
/// conversion of `half`'s.
fn slice_converted<I, O: Default + Clone>(v: &[I], fill: impl FnOnce(&[I], &mut [O])) -> Vec<O> {
    let mut out = vec![O::default(); v.len()];
    fill(v, &mut out);
    out
}

/// `x` rounded to odd in f32: toward zero, then, where that was inexact, the
/// last bit set. Rounding this to nearest in a type of at most 22 bits of
/// precision (f16: 11, bf16: 8) gives what rounding `x` there once gives:
/// the bits it drops are nonzero exactly when `x`'s were, so a midpoint is
/// never made nor unmade.
fn to_f32_odd(x: f64) -> f32 {
    let y = x as f32;
    let back = f64::from(y);
    // Exact (or NaN), or rounded to the odd one of its two neighbours.
    if back == x || x.is_nan() || y.to_bits() & 1 == 1 {
        return y;
    }
    // Rounded to the even one: the other neighbour, on `x`'s side (one step
    // of the magnitude; past f32's range that is its largest value).
    let toward_zero = back.abs() > x.abs();
    let bits = y.to_bits();
    f32::from_bits(if toward_zero { bits - 1 } else { bits + 1 })
}

/// The elements of a host tensor, in their stored type.
#[derive(Clone, Debug, PartialEq)]
pub enum HostData {
    /// [`DType::F64`] elements, row-major.
    F64(Vec<f64>),
    /// [`DType::F32`] elements, row-major.
    F32(Vec<f32>),
    /// [`DType::F16`] elements, row-major.
    F16(Vec<f16>),
    /// [`DType::BF16`] elements, row-major.
    BF16(Vec<bf16>),
}

/// A row-major tensor of `T` in host memory: the tensors of the CPU backends
/// ([`RefTensor`](crate::reference::RefTensor) of f64,
/// [`CpuTensor`](crate::cpu::CpuTensor) of f32). The shape always matches the
/// element count.
#[derive(Clone, Debug, PartialEq)]
pub struct Dense<T> {
    pub(crate) shape: Vec<usize>,
    pub(crate) data: Vec<T>,
}

impl<T: Clone> Dense<T> {
    /// A tensor from its elements, without a copy; the count must match the shape.
    pub fn new(shape: Vec<usize>, data: Vec<T>) -> Result<Self> {
        let n = checked_numel(&shape, "tensor")?;
        if n != data.len() {
            return Err(Error::invalid(format!(
                "shape {shape:?} holds {n} elements but {} were given",
                data.len()
            )));
        }
        Ok(Dense { shape, data })
    }

    /// A tensor of `shape` holding `value` everywhere; an error, not an
    /// abort, where it cannot be allocated.
    pub fn filled(shape: &[usize], value: T) -> Result<Self> {
        let n = checked_numel(shape, "tensor")?;
        Dense::new(shape.to_vec(), try_filled(n, value, "tensor")?)
    }

    /// The elements, row-major.
    pub fn data(&self) -> &[T] {
        &self.data
    }

    /// The elements, row-major, to write in place (the shape stays).
    pub fn data_mut(&mut self) -> &mut [T] {
        &mut self.data
    }

    /// The elements, row-major, taking the tensor apart (no copy).
    pub fn into_data(self) -> Vec<T> {
        self.data
    }
}

impl<T> crate::ops::Shaped for Dense<T> {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
}

/// A row-major tensor in host memory. The shape always matches the element count.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    shape: Vec<usize>,
    data: HostData,
}

/// The number of elements of `shape`, or an overflow error naming `what`.
pub fn checked_numel(shape: &[usize], what: &str) -> Result<usize> {
    shape.iter().try_fold(1usize, |acc, &d| {
        acc.checked_mul(d).ok_or_else(|| {
            Error::Overflow(format!(
                "{what}: the element count of shape {shape:?} overflows"
            ))
        })
    })
}

/// A vector of `n` copies of `value`, or an error (never an abort) when `n`
/// elements cannot be allocated; `what` names the tensor in the message.
pub fn try_filled<T: Clone>(n: usize, value: T, what: &str) -> Result<Vec<T>> {
    let mut v = try_with_capacity(n, what)?;
    v.resize(n, value);
    Ok(v)
}

/// `n` zeros, or an error (never an abort) when they cannot be allocated.
/// The allocator's zeroed pages: nothing is written until the first touch.
pub(crate) fn try_zeroed<T: bytemuck::Zeroable>(n: usize, what: &str) -> Result<Vec<T>> {
    let size = std::mem::size_of::<T>();
    check_room(n, size, what)?;
    bytemuck::allocation::try_zeroed_vec(n)
        .map_err(|()| out_of_memory(n, size, what, String::new()))
}

/// A copy of `src`, or an error (never an abort) when it cannot be allocated.
pub fn try_copied<T: Copy>(src: &[T], what: &str) -> Result<Vec<T>> {
    let mut v = try_with_capacity(src.len(), what)?;
    v.extend_from_slice(src);
    Ok(v)
}

/// An empty vector with room for `n` elements. An allocator that overcommits
/// (Linux's default) grants more than the machine has, and the kernel ends
/// the process when the pages are written, so a large request is first
/// measured against [`memory_available`].
pub(crate) fn try_with_capacity<T>(n: usize, what: &str) -> Result<Vec<T>> {
    let size = std::mem::size_of::<T>();
    check_room(n, size, what)?;
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| out_of_memory(n, size, what, String::new()))?;
    Ok(v)
}

/// An error unless `n` elements of `size` bytes fit in the memory left
/// ([`memory_available`]; from 64 MiB up).
pub(crate) fn check_room(n: usize, size: usize, what: &str) -> Result<()> {
    let bytes = n.saturating_mul(size) as u64;
    if bytes >= CHECKED_BYTES {
        if let Some(free) = memory_available() {
            if bytes > free {
                let why = format!(" ({} MiB; {} MiB available)", bytes >> 20, free >> 20);
                return Err(out_of_memory(n, size, what, why));
            }
        }
    }
    Ok(())
}

fn out_of_memory(n: usize, size: usize, what: &str, why: String) -> Error {
    Error::OutOfMemory(format!(
        "{what}: cannot allocate {n} elements of {size} bytes{why}"
    ))
}

/// The error of a finite `value`, at flat index `i` of what `what` names,
/// that would be infinite in `dtype`.
pub(crate) fn overflows(what: &str, value: f64, i: usize, dtype: DType) -> Error {
    Error::invalid(format!(
        "{what}: {value} at flat index {i} overflows {dtype} storage"
    ))
}

/// Allocations from this size on are checked against [`memory_available`]
/// (reading it costs a few file reads).
const CHECKED_BYTES: u64 = 64 << 20;

/// Bytes this process can still be given before the kernel's out-of-memory
/// killer steps in: free and reclaimable memory plus free swap, and no more
/// than its control group's limit allows (cgroup v2, else v1), not counting
/// the group's reclaimable file cache as used. `None` where the system does
/// not say (outside Linux).
pub fn memory_available() -> Option<u64> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let meminfo = read("/proc/meminfo")?;
    let kib = |name: &str| field(&meminfo, name).map(|k| k.saturating_mul(1024));
    let mut free = kib("MemAvailable")?.saturating_add(kib("SwapFree").unwrap_or(0));
    // (limit, usage, statistics, the file cache the kernel can reclaim)
    let groups = [
        (
            "memory.max",
            "memory.current",
            "memory.stat",
            "inactive_file",
        ),
        (
            "memory/memory.limit_in_bytes",
            "memory/memory.usage_in_bytes",
            "memory/memory.stat",
            "total_inactive_file",
        ),
    ];
    let number = |name: &str| {
        read(&format!("/sys/fs/cgroup/{name}"))?
            .trim()
            .parse::<u64>()
            .ok()
    };
    for (limit, usage, stat, cache) in groups {
        // cgroup v2 writes "max" for no limit, which is no number.
        if let (Some(limit), Some(usage)) = (number(limit), number(usage)) {
            let stat = read(&format!("/sys/fs/cgroup/{stat}"));
            let cache = stat.and_then(|s| field(&s, cache)).unwrap_or(0);
            free = free.min(limit.saturating_sub(usage.saturating_sub(cache)));
            break;
        }
    }
    Some(free)
}

/// The number after `name` (or `name:`) at the start of a line of `text`,
/// as /proc/meminfo and cgroups' memory.stat write them.
fn field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        let key = words.next()?;
        (key.strip_suffix(':').unwrap_or(key) == name).then(|| words.next()?.parse().ok())?
    })
}

impl HostTensor {
    /// Build a tensor, checking that `data` has exactly as many elements as `shape`.
    pub fn new(shape: Vec<usize>, data: HostData) -> Result<Self> {
        let n = checked_numel(&shape, "tensor")?;
        let len = match &data {
            HostData::F64(v) => v.len(),
            HostData::F32(v) => v.len(),
            HostData::F16(v) => v.len(),
            HostData::BF16(v) => v.len(),
        };
        if n != len {
            return Err(Error::invalid(format!(
                "shape {shape:?} holds {n} elements but {len} were given"
            )));
        }
        Ok(HostTensor { shape, data })
    }

    /// An f32 tensor of seeded standard normal values; an error naming `what`,
    /// not an abort, when the shape is too large to allocate.
    pub fn randn(shape: Vec<usize>, seed: u64, what: &str) -> Result<Self> {
        let n = checked_numel(&shape, what)?;
        let mut data = try_filled(n, 0.0f32, what)?;
        let mut rng = crate::rng::Rng::new(seed);
        for x in &mut data {
            *x = rng.normal() as f32;
        }
        Self::from_f32(shape, data)
    }

    /// An f64 tensor.
    pub fn from_f64(shape: Vec<usize>, data: Vec<f64>) -> Result<Self> {
        Self::new(shape, HostData::F64(data))
    }

    /// An f32 tensor.
    pub fn from_f32(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        Self::new(shape, HostData::F32(data))
    }

    /// Dimensions, outermost first; `[]` for a scalar.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The elements in their stored dtype.
    pub fn data(&self) -> &HostData {
        &self.data
    }

    /// Number of elements (the product of the shape).
    pub fn numel(&self) -> usize {
        match &self.data {
            HostData::F64(v) => v.len(),
            HostData::F32(v) => v.len(),
            HostData::F16(v) => v.len(),
            HostData::BF16(v) => v.len(),
        }
    }

    /// The stored element type.
    pub fn dtype(&self) -> DType {
        match &self.data {
            HostData::F64(_) => DType::F64,
            HostData::F32(_) => DType::F32,
            HostData::F16(_) => DType::F16,
            HostData::BF16(_) => DType::BF16,
        }
    }

    /// The same elements under another shape with the same element count.
    pub fn reshape(self, shape: Vec<usize>) -> Result<Self> {
        Self::new(shape, self.data)
    }

    /// Rows `rows` of the first dimension (e.g. the q or the k/v part of a packed
    /// `in_proj_weight`), in the stored dtype.
    pub fn rows(&self, rows: std::ops::Range<usize>) -> Result<Self> {
        let Some((&first, rest)) = self.shape.split_first() else {
            return Err(Error::invalid("rows of a scalar tensor"));
        };
        if rows.start > rows.end || rows.end > first {
            return Err(Error::invalid(format!(
                "rows {rows:?} out of range for shape {:?}",
                self.shape
            )));
        }
        // Countable even where the first dimension is 0 (no elements).
        let cols = checked_numel(rest, "rows")?;
        let r = rows.start * cols..rows.end * cols;
        let data = match &self.data {
            HostData::F64(v) => HostData::F64(v[r].to_vec()),
            HostData::F32(v) => HostData::F32(v[r].to_vec()),
            HostData::F16(v) => HostData::F16(v[r].to_vec()),
            HostData::BF16(v) => HostData::BF16(v[r].to_vec()),
        };
        let mut shape = self.shape.clone();
        shape[0] = rows.len();
        Self::new(shape, data)
    }

    /// `parts` stacked along the first dimension (same dtype, same other
    /// dimensions), e.g. several layers' weights as one.
    pub fn concat_rows(parts: &[HostTensor]) -> Result<Self> {
        let first = parts
            .first()
            .ok_or_else(|| Error::invalid("concat_rows: no tensors"))?;
        let rest = first.shape.get(1..).unwrap_or(&[]);
        let mut rows = 0usize;
        for p in parts {
            if p.dtype() != first.dtype() || p.shape.is_empty() || &p.shape[1..] != rest {
                return Err(Error::invalid(format!(
                    "concat_rows: a {} tensor of shape {:?} does not stack onto a {} tensor of \
                     shape {:?}",
                    p.dtype().name(),
                    p.shape,
                    first.dtype().name(),
                    first.shape
                )));
            }
            rows = rows
                .checked_add(p.shape[0])
                .ok_or_else(|| Error::Overflow("concat_rows: rows".into()))?;
        }
        // Every part has `first`'s variant (checked above).
        macro_rules! stack {
            ($variant:ident) => {
                HostData::$variant(
                    parts
                        .iter()
                        .flat_map(|p| match &p.data {
                            HostData::$variant(v) => v.as_slice(),
                            _ => &[],
                        })
                        .copied()
                        .collect(),
                )
            };
        }
        let data = match &first.data {
            HostData::F64(_) => stack!(F64),
            HostData::F32(_) => stack!(F32),
            HostData::F16(_) => stack!(F16),
            HostData::BF16(_) => stack!(BF16),
        };
        let mut shape = first.shape.clone();
        shape[0] = rows;
        Self::new(shape, data)
    }

    /// `times` copies of the tensor one after another along its first
    /// dimension (PyTorch's `repeat(times, 1, ...)`), in its own dtype; `what`
    /// names the result in an error.
    pub fn repeat(&self, times: usize, what: &str) -> Result<Self> {
        let mut shape = self.shape.clone();
        let first = shape
            .first_mut()
            .ok_or_else(|| Error::invalid(format!("{what}: a scalar has no rows to repeat")))?;
        *first = first.checked_mul(times).ok_or_else(|| {
            Error::Overflow(format!("{what}: {times} copies of {:?}", self.shape))
        })?;
        let n = checked_numel(&shape, what)?;
        macro_rules! repeat {
            ($v:expr) => {{
                let mut out = try_with_capacity(n, what)?;
                for _ in 0..times {
                    out.extend_from_slice($v);
                }
                out
            }};
        }
        let data = match &self.data {
            HostData::F64(v) => HostData::F64(repeat!(v)),
            HostData::F32(v) => HostData::F32(repeat!(v)),
            HostData::F16(v) => HostData::F16(repeat!(v)),
            HostData::BF16(v) => HostData::BF16(repeat!(v)),
        };
        Self::new(shape, data)
    }

    /// Every element widened (exactly) to f64.
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match &self.data {
            HostData::F64(v) => v.clone(),
            HostData::F32(v) => v.iter().map(|&x| x as f64).collect(),
            HostData::F16(v) => slice_converted(v, |v, out| v.convert_to_f64_slice(out)),
            HostData::BF16(v) => slice_converted(v, |v, out| v.convert_to_f64_slice(out)),
        }
    }

    /// Every element converted to f32 (rounded to nearest from f64).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match &self.data {
            HostData::F64(v) => v.iter().map(|&x| x as f32).collect(),
            HostData::F32(v) => v.clone(),
            HostData::F16(v) => slice_converted(v, |v, out| v.convert_to_f32_slice(out)),
            HostData::BF16(v) => slice_converted(v, |v, out| v.convert_to_f32_slice(out)),
        }
    }

    /// [`to_f32_vec`](Self::to_f32_vec) that moves an f32 tensor's elements
    /// instead of copying them.
    pub fn into_f32_vec(self) -> Vec<f32> {
        match self.data {
            HostData::F32(v) => v,
            _ => self.to_f32_vec(),
        }
    }

    /// The shape and the elements, moved out.
    pub fn into_parts(self) -> (Vec<usize>, HostData) {
        (self.shape, self.data)
    }

    /// The tensor converted to `dtype` (round to nearest even).
    pub fn to_dtype(&self, dtype: DType) -> HostTensor {
        let data = if self.dtype() == dtype {
            self.data.clone()
        } else {
            match dtype {
                DType::F64 => HostData::F64(self.to_f64_vec()),
                DType::F32 => HostData::F32(self.to_f32_vec()),
                DType::F16 => self.converted::<f16>(),
                DType::BF16 => self.converted::<bf16>(),
            }
        };
        HostTensor {
            shape: self.shape.clone(),
            data,
        }
    }

    /// Each element converted once, with no f32 copy of the whole.
    fn converted<T: Element>(&self) -> HostData {
        // From f32, `half`'s slice conversions: F16C where the CPU has it,
        // rounded as the element-wise ones are.
        if let HostData::F32(v) = &self.data {
            match T::DTYPE {
                DType::F16 => {
                    return HostData::F16(slice_converted(v, |v, out| {
                        out.convert_from_f32_slice(v)
                    }))
                }
                DType::BF16 => {
                    return HostData::BF16(slice_converted(v, |v, out| {
                        out.convert_from_f32_slice(v)
                    }))
                }
                _ => {}
            }
        }
        T::into_data(match &self.data {
            HostData::F64(v) => v.iter().map(|&x| T::from_f64(x)).collect(),
            HostData::F32(v) => v.iter().map(|&x| T::from_f32(x)).collect(),
            HostData::F16(v) => v.iter().map(|x| T::from_f32(x.to_f32())).collect(),
            HostData::BF16(v) => v.iter().map(|x| T::from_f32(x.to_f32())).collect(),
        })
    }

    /// [`to_dtype`](Self::to_dtype) into a backend's storage: an error, led by
    /// `what`, where a finite element overflows `dtype` (f16 tops out at
    /// 65504) instead of silently becoming infinite. NaN and infinities pass
    /// as they are: a forward propagates them, as PyTorch's does.
    ///
    /// Like the other checked allocations, the copy is first measured
    /// against the memory left.
    ///
    /// ```
    /// use output_projector::tensor::{DType, HostTensor};
    ///
    /// # fn main() -> output_projector::Result<()> {
    /// let t = HostTensor::from_f32(vec![3], vec![1.5, -2.0, 70000.0])?;
    /// assert!(t.to_storage(DType::BF16, "hidden")?.to_f64_vec() == [1.5, -2.0, 70144.0]);
    /// // 70000 is past f16's 65504: an error, where `to_dtype` gives infinity.
    /// assert!(t.to_storage(DType::F16, "hidden").is_err());
    /// assert!(t.to_dtype(DType::F16).to_f64_vec()[2].is_infinite());
    /// # Ok(())
    /// # }
    /// ```
    pub fn to_storage(&self, dtype: DType, what: &str) -> Result<HostTensor> {
        check_room(self.numel(), dtype.size(), what)?;
        let converted = self.to_dtype(dtype);
        let mut from = 0;
        while let Some((i, _)) = converted.non_finite_from(from) {
            let value = self.value(i);
            if value.is_finite() {
                return Err(overflows(what, value, i, dtype));
            }
            from = i + 1;
        }
        Ok(converted)
    }

    /// Element `i` (in bounds) as f64.
    fn value(&self, i: usize) -> f64 {
        match &self.data {
            HostData::F64(v) => v[i],
            HostData::F32(v) => v[i] as f64,
            HostData::F16(v) => v[i].to_f64(),
            HostData::BF16(v) => v[i].to_f64(),
        }
    }

    /// The first non-finite element, if any, as `(flat index, value)`.
    pub fn first_non_finite(&self) -> Option<(usize, f64)> {
        self.non_finite_from(0)
    }

    /// The first non-finite element at or after flat index `from`.
    fn non_finite_from(&self, from: usize) -> Option<(usize, f64)> {
        // Sliced, not skipped: a scan resumed after each find stays one pass.
        // Blocks of elements are tested without a branch each (so the test
        // vectorises, on the stored bits: no conversion), and only a block
        // that holds one is searched.
        fn find<T: Element>(
            v: &[T],
            from: usize,
            finite: impl Fn(T) -> bool,
        ) -> Option<(usize, f64)> {
            let rest = v.get(from..)?;
            let block = rest
                .chunks(1024)
                .position(|b| !b.iter().fold(true, |all, &x| all & finite(x)))?;
            let (i, x) = rest[block * 1024..]
                .iter()
                .enumerate()
                .find(|&(_, &x)| !finite(x))?;
            Some((from + block * 1024 + i, x.to_f64()))
        }
        match &self.data {
            HostData::F64(v) => find(v, from, f64::is_finite),
            HostData::F32(v) => find(v, from, f32::is_finite),
            HostData::F16(v) => find(v, from, f16::is_finite),
            HostData::BF16(v) => find(v, from, bf16::is_finite),
        }
    }

    /// An error naming `key` if any element is NaN or infinite.
    pub fn check_finite(&self, key: &str) -> Result<()> {
        match self.first_non_finite() {
            None => Ok(()),
            Some((index, value)) => Err(Error::NonFinite {
                key: key.to_string(),
                index,
                value,
            }),
        }
    }

    /// An error naming `key` unless the shape is exactly `expected`.
    pub fn check_shape(&self, key: &str, expected: &[usize]) -> Result<()> {
        if self.shape != expected {
            return Err(Error::Shape {
                key: key.to_string(),
                expected: expected.to_vec(),
                found: self.shape.clone(),
            });
        }
        Ok(())
    }

    /// The raw little-endian bytes, as safetensors stores them.
    pub fn as_bytes(&self) -> &[u8] {
        match &self.data {
            HostData::F64(v) => bytemuck::cast_slice(v),
            HostData::F32(v) => bytemuck::cast_slice(v),
            HostData::F16(v) => bytemuck::cast_slice(v),
            HostData::BF16(v) => bytemuck::cast_slice(v),
        }
    }
}

/// Relative error `||out - ref|| / ||ref||` (with `||ref|| = 0` giving `||out||`) and
/// the largest absolute difference. Any NaN in `out` gives an infinite error, so an
/// unwritten (poisoned) element always fails a comparison.
pub fn compare(out: &[f64], reference: &[f64]) -> (f64, f64) {
    if out.len() != reference.len() {
        return (f64::INFINITY, f64::INFINITY);
    }
    let (mut diff2, mut ref2, mut max_abs) = (0.0f64, 0.0f64, 0.0f64);
    for (&o, &r) in out.iter().zip(reference) {
        if !o.is_finite() && o != r {
            return (f64::INFINITY, f64::INFINITY);
        }
        let d = o - r;
        diff2 += d * d;
        ref2 += r * r;
        max_abs = max_abs.max(d.abs());
    }
    let rel = if ref2 > 0.0 {
        (diff2 / ref2).sqrt()
    } else {
        diff2.sqrt()
    };
    (rel, max_abs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// f64 to f16 and bf16 rounds once, to nearest even: a value a hair
    /// past the midpoint of every pair of neighbours (either sign, normal
    /// or subnormal) goes to its side, an exact midpoint to the even one,
    /// the largest finite values and infinity where they should. `half`'s
    /// own conversions miss half of the near-midpoint cases.
    #[test]
    fn f64_rounds_once_to_16_bits() {
        fn check<T: Element>(top: u16, bits: impl Fn(T) -> u16, from_bits: impl Fn(u16) -> T) {
            for b in 0..top {
                for sign in [0, 0x8000] {
                    let (lo, hi) = (from_bits(sign | b).to_f64(), from_bits(sign | (b + 1)));
                    // Past the largest value, the one a wider exponent would give.
                    let hi = match hi.to_f64() {
                        h if h.is_infinite() => 2.0 * lo - from_bits(sign | (b - 1)).to_f64(),
                        h => h,
                    };
                    let mid = (lo + hi) / 2.0;
                    let even = if b % 2 == 0 { b } else { b + 1 };
                    for (x, want) in [
                        (mid * (1.0 + 1e-12), b + 1),
                        (mid * (1.0 - 1e-12), b),
                        (mid, even),
                        (lo, b),
                    ] {
                        let got = bits(T::from_f64(x)) & 0x7fff;
                        assert_eq!(got, want, "{} {x:e} from {b:#06x}", T::DTYPE);
                    }
                }
            }
        }
        // Every finite value and the one past the largest (infinity).
        check::<f16>(0x7c00, f16::to_bits, f16::from_bits);
        check::<bf16>(0x7f80, bf16::to_bits, bf16::from_bits);
        assert!(f16::from_f64(f64::NAN).is_nan() && <f16 as Element>::from_f64(f64::NAN).is_nan());
        assert_eq!(<bf16 as Element>::from_f64(-1e300), bf16::NEG_INFINITY);
        assert_eq!(<f16 as Element>::from_f64(1e-300).to_bits(), 0);
    }

    /// The first non-finite element is found wherever it lies: first or
    /// last of a block of the scan, in a short last block, behind another.
    #[test]
    fn non_finite_elements_are_found_anywhere() -> Result<()> {
        for dtype in [DType::F64, DType::F32, DType::F16, DType::BF16] {
            let clean = HostTensor::from_f64(vec![3000], vec![1.5; 3000])?.to_dtype(dtype);
            assert_eq!(clean.first_non_finite(), None, "{dtype}");
            for at in [0, 1023, 1024, 2047, 2048, 2999] {
                for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
                    let mut v = vec![1.5; 3000];
                    v[at] = bad;
                    if let Some(next) = v.get_mut(at + 1) {
                        *next = f64::NAN;
                    }
                    let t = HostTensor::from_f64(vec![3000], v)?.to_dtype(dtype);
                    let (i, x) = t.first_non_finite().expect("found");
                    assert_eq!(i, at, "{dtype} {bad}");
                    assert!(x.is_nan() == bad.is_nan() && !x.is_finite(), "{dtype}");
                }
            }
        }
        Ok(())
    }

    /// The slice conversions give the element-wise ones' bits: subnormals,
    /// ties, the largest values, infinities and NaN included.
    #[test]
    fn slice_conversions_match_element_wise_ones() -> Result<()> {
        let mut rng = crate::rng::Rng::new(5);
        let mut v: Vec<f32> = (0..5000)
            .map(|i| (rng.normal() * (2.0f64).powi(i % 60 - 30)) as f32)
            .collect();
        v.extend([
            0.0,
            -0.0,
            65504.0,
            65520.0,
            1e-8,
            f32::MAX,
            f32::INFINITY,
            f32::NAN,
        ]);
        v.extend((0..64).map(|i| f16::from_bits(i * 977).to_f32() + 2.0f32.powi(-25)));
        let t = HostTensor::from_f32(vec![v.len()], v.clone())?;
        let bits = |t: &HostTensor| match t.data() {
            HostData::F16(h) => h.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            HostData::BF16(h) => h.iter().map(|x| x.to_bits()).collect(),
            _ => unreachable!(),
        };
        let f16s: Vec<u16> = v.iter().map(|&x| f16::from_f32(x).to_bits()).collect();
        let bf16s: Vec<u16> = v.iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
        let (h, b) = (t.to_dtype(DType::F16), t.to_dtype(DType::BF16));
        assert_eq!(bits(&h), f16s);
        assert_eq!(bits(&b), bf16s);
        for narrow in [&h, &b] {
            let one_by_one: Vec<u32> = match narrow.data() {
                HostData::F16(x) => x.iter().map(|x| x.to_f32().to_bits()).collect(),
                HostData::BF16(x) => x.iter().map(|x| x.to_f32().to_bits()).collect(),
                _ => unreachable!(),
            };
            let wide: Vec<u32> = narrow.to_f32_vec().iter().map(|x| x.to_bits()).collect();
            assert_eq!(wide, one_by_one);
            let wider: Vec<u64> = narrow.to_f64_vec().iter().map(|x| x.to_bits()).collect();
            let from_f32: Vec<u64> = narrow
                .to_f32_vec()
                .iter()
                .map(|&x| f64::from(x).to_bits())
                .collect();
            assert_eq!(wider, from_f32);
        }
        Ok(())
    }

    #[test]
    fn storage_conversion_refuses_overflow_and_passes_non_finite_values() -> Result<()> {
        let t = HostTensor::from_f32(vec![4], vec![1.0, f32::NAN, f32::INFINITY, 70000.0])?;
        let e = t.to_storage(DType::F16, "upload").unwrap_err().to_string();
        assert_eq!(e, "upload: 70000 at flat index 3 overflows f16 storage");
        let t = HostTensor::from_f32(vec![3], vec![65504.0, f32::NAN, f32::NEG_INFINITY])?;
        let half = t.to_storage(DType::F16, "upload")?;
        assert_eq!(half.to_f64_vec()[0], 65504.0);
        assert!(half.to_f64_vec()[1].is_nan());
        let big = HostTensor::from_f64(vec![1], vec![1e300])?;
        assert!(big.to_storage(DType::F32, "upload").is_err());
        assert!(big.to_storage(DType::BF16, "upload").is_err());
        assert!(big.to_storage(DType::F64, "upload").is_ok());
        // A poisoned (all-NaN) tensor of 2^22 elements: one pass (a scan
        // restarted after each NaN would take hours here).
        let nan = HostTensor::from_f32(vec![1 << 22], vec![f32::NAN; 1 << 22])?;
        assert!(nan.to_storage(DType::BF16, "upload")?.to_f64_vec()[1 << 21].is_nan());
        Ok(())
    }

    #[test]
    fn rows_of_scalars_and_of_uncountable_empties_are_errors() -> Result<()> {
        let scalar = HostTensor::from_f32(vec![], vec![1.0])?;
        assert!(scalar.rows(0..0).is_err());
        let empty = HostTensor::from_f32(vec![0, 1 << 40, 1 << 40], vec![])?;
        assert!(matches!(empty.rows(0..0), Err(Error::Overflow(_))));
        let t = HostTensor::from_f32(vec![3, 2], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0])?;
        assert_eq!(t.rows(1..3)?.to_f32_vec(), vec![3.0, 4.0, 5.0, 6.0]);
        Ok(())
    }

    #[test]
    fn concat_rows_stacks_in_order_and_refuses_what_does_not_stack() -> Result<()> {
        let a = HostTensor::from_f32(vec![1, 2], vec![1.0, 2.0])?;
        let b = HostTensor::from_f32(vec![2, 2], vec![3.0, 4.0, 5.0, 6.0])?;
        let ab = HostTensor::concat_rows(&[a.clone(), b.clone()])?;
        assert_eq!(ab.shape(), &[3, 2]);
        assert_eq!(ab.to_f32_vec(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let half = HostTensor::concat_rows(&[a.to_dtype(DType::BF16), b.to_dtype(DType::BF16)])?;
        assert_eq!(half.dtype(), DType::BF16);
        assert_eq!(half.to_f32_vec(), ab.to_f32_vec());
        assert!(HostTensor::concat_rows(&[]).is_err());
        assert!(HostTensor::concat_rows(&[a.clone(), b.to_dtype(DType::F16)]).is_err());
        let c = HostTensor::from_f32(vec![1, 3], vec![0.0; 3])?;
        assert!(HostTensor::concat_rows(&[a, c]).is_err());
        let scalar = HostTensor::from_f32(vec![], vec![1.0])?;
        assert!(HostTensor::concat_rows(&[scalar]).is_err());
        Ok(())
    }

    #[test]
    fn repeat_tiles_the_first_dimension_in_the_tensor_s_own_dtype() -> Result<()> {
        let one = HostTensor::from_f32(vec![1, 2, 2], vec![1.0, 2.0, 3.0, 4.0])?;
        let three = one.to_dtype(DType::F16).repeat(3, "queries")?;
        assert_eq!(three.shape(), &[3, 2, 2]);
        assert_eq!(three.dtype(), DType::F16);
        assert_eq!(three.to_f64_vec(), [1.0, 2.0, 3.0, 4.0].repeat(3));
        let none = one.repeat(0, "queries")?;
        assert_eq!((none.shape(), none.numel()), (&[0, 2, 2][..], 0));
        let scalar = HostTensor::from_f32(vec![], vec![1.0])?;
        let e = scalar.repeat(2, "queries").unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{e:?}");
        let e = one.repeat(usize::MAX, "queries").unwrap_err();
        assert!(matches!(e, Error::Overflow(_)), "{e:?}");
        Ok(())
    }

    #[test]
    fn fields_are_read_as_proc_and_cgroups_write_them() {
        let meminfo =
            "MemTotal:       24683568 kB\nMemFree:  100 kB\nMemAvailable:   23987596 kB\n";
        assert_eq!(field(meminfo, "MemAvailable"), Some(23987596));
        assert_eq!(field(meminfo, "MemFree"), Some(100));
        assert_eq!(field(meminfo, "SwapFree"), None);
        let stat = "anon 4096\nactive_file 7\ninactive_file 123\n";
        assert_eq!(field(stat, "inactive_file"), Some(123));
        assert_eq!(field(stat, "file"), None);
        assert_eq!(field("inactive_file x\n", "inactive_file"), None);
    }

    /// A request past what the machine can give is refused before anything
    /// is reserved or written (the kernel would otherwise end the process
    /// once the pages were touched).
    #[cfg(target_os = "linux")]
    #[test]
    fn allocations_past_the_available_memory_are_refused() {
        let free = memory_available().expect("/proc/meminfo is readable on Linux");
        assert!(free > 0);
        let n = usize::try_from(free / 4 + 1).expect("fits usize");
        let e = try_with_capacity::<f32>(n, "big").unwrap_err().to_string();
        assert!(e.starts_with("out of memory: big: cannot allocate"), "{e}");
        assert!(e.ends_with("MiB available)"), "{e}");
        let v = try_filled(CHECKED_BYTES as usize / 4, 1.0f32, "checked, fits").expect("64 MiB");
        assert_eq!(v.len(), (CHECKED_BYTES / 4) as usize);
        assert_eq!(try_copied(&v[..3], "small").expect("copied"), [1.0; 3]);
    }
}
