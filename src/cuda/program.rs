//! The kernel files (`kernels/*.cu`, embedded at build time), compiling them for
//! a device, and the caches of the results: in memory for the process, and
//! optionally on disk (see [`KernelCache`]).
//!
//! Every file is compiled once per storage type (f32, f16, bf16: `OP_ELEM` 0, 1,
//! 2, see `kernels/common.cuh`); the entry points of the f16 and bf16 compiles
//! carry the suffix `_f16` / `_bf16`. The f32 compile also has the TF32
//! tensor-core kernels for sm_80 and newer where the CUDA headers' `mma.h` is
//! found (see [`tf32_compiled`]); without it f32 needs no headers at all.
//!
//! Every program is compiled with `kernels/common.cuh` as an in-memory header and
//! with `static_assert`s appended that pin the size and field offsets of each
//! kernel parameter struct to its `#[repr(C)]` mirror on the host: a layout that
//! drifts apart is a compile error, never a kernel reading the wrong argument.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use super::{compile_options, compile_with_headers, probe_nvrtc, Compiled, KernelReport};
use crate::error::{Error, Result};
use crate::tensor::DType;

/// The storage types the kernels are compiled for, in report order.
pub const STORAGE_TYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// `OP_ELEM` of kernels/common.cuh for `storage`.
pub(crate) fn elem_code(storage: DType) -> Result<u32> {
    match storage {
        DType::F32 => Ok(0),
        DType::F16 => Ok(1),
        DType::BF16 => Ok(2),
        DType::F64 => Err(Error::invalid(
            "the CUDA kernels store f32, f16 or bf16, not f64",
        )),
    }
}

/// What the entry points of a `storage` compile append to their base name.
pub(crate) fn kernel_suffix(storage: DType) -> &'static str {
    match storage {
        DType::F16 => "_f16",
        DType::BF16 => "_bf16",
        _ => "",
    }
}

/// Whether the CUDA headers NVRTC is given hold `mma.h` (WMMA): the f32
/// compiles then define `OP_TF32` and have the TF32 kernels.
pub(crate) fn mma_header_found() -> bool {
    super::cuda_include_dir().is_some_and(|d| d.join("mma.h").is_file())
}

/// The compute capability of an `sm_XY` architecture name as `XY`, if it is one.
fn arch_number(arch: &str) -> Option<u32> {
    let digits: String = arch
        .strip_prefix("sm_")?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Whether a `storage` compile for `arch` has the TF32 kernels: f32 storage,
/// sm_80 or newer (TF32 tensor cores) and `mma.h` found.
pub(crate) fn tf32_compiled(storage: DType, arch: &str) -> bool {
    storage == DType::F32 && arch_number(arch).is_some_and(|n| n >= 80) && mma_header_found()
}

/// Whether a `storage` compile for `arch` has the warpgroup-MMA kernels:
/// 16-bit storage, for sm_90a (`wgmma` is that architecture's own, compiled
/// only where `__CUDA_ARCH_FEAT_SM90_ALL` is defined).
pub(crate) fn wgmma_compiled(storage: DType, arch: &str) -> bool {
    storage != DType::F32 && arch == "sm_90a"
}

/// The shared header, as the kernel files include it.
pub(crate) const COMMON: (&str, &str) = ("common.cuh", include_str!("../../kernels/common.cuh"));

/// One kernel file: its source, the kernels (extern "C" entry points) the host
/// launches from it, and the layout checks of its parameter structs.
pub(crate) struct Program {
    /// File name under `kernels/`.
    pub file: &'static str,
    pub source: &'static str,
    /// Every entry point of the file (base names, in every storage type).
    pub kernels: &'static [&'static str],
    /// Entry points only the f32 compile has (CUDA-core kernels that 16-bit
    /// storage never takes: it has tensor cores for those shapes).
    pub f32_kernels: &'static [&'static str],
    /// Entry points only the f16 and bf16 compiles have (tensor-core kernels).
    pub half_kernels: &'static [&'static str],
    /// Entry points only the f32 compile has, where [`tf32_compiled`] says so
    /// (TF32 tensor-core kernels).
    pub tf32_kernels: &'static [&'static str],
    /// Entry points only the f16 and bf16 compiles for sm_90a have, where
    /// [`wgmma_compiled`] says so (warpgroup-MMA kernels).
    pub wgmma_kernels: &'static [&'static str],
    /// `static_assert`s of the parameter structs' layouts (see [`param_layout`]).
    pub layouts: fn() -> String,
}

impl Program {
    /// The base names of the entry points a `storage` compile for `arch` has.
    pub fn kernels_for(&self, storage: DType, arch: &str) -> impl Iterator<Item = &'static str> {
        let storage_only = if storage == DType::F32 {
            self.f32_kernels
        } else {
            self.half_kernels
        };
        let tf32: &'static [&'static str] = if tf32_compiled(storage, arch) {
            self.tf32_kernels
        } else {
            &[]
        };
        let wgmma: &'static [&'static str] = if wgmma_compiled(storage, arch) {
            self.wgmma_kernels
        } else {
            &[]
        };
        self.kernels
            .iter()
            .chain(storage_only)
            .chain(tf32)
            .chain(wgmma)
            .copied()
    }

    /// The source as compiled for `storage`: the storage define (and for f32
    /// `OP_TF32` where the file has TF32 kernels and `mma.h` is found), the
    /// file and the layout checks.
    pub fn full_source(&self, storage: DType) -> Result<String> {
        let tf32 = if storage == DType::F32 && !self.tf32_kernels.is_empty() && mma_header_found() {
            "#define OP_TF32 1\n"
        } else {
            ""
        };
        Ok(format!(
            "#define OP_ELEM {}\n{tf32}{}",
            elem_code(storage)?,
            self.base_source()
        ))
    }

    fn base_source(&self) -> String {
        // NVRTC has no offsetof (no <cstddef> without a toolkit, no
        // __builtin_offsetof); its EDG front end folds __INTADDR__ of a member
        // address to a constant, which is what offsetof expands to there.
        format!(
            "{}\n// Parameter layouts as the host lays them out.\n\
             #define OP_HOST_OFFSETOF(T, f) ((unsigned long long)__INTADDR__(&((T*)0)->f))\n{}",
            self.source,
            (self.layouts)()
        )
    }
}

/// `static_assert`s that a C struct of the same name has the size and field
/// offsets of the `#[repr(C)]` Rust struct `$ty`.
macro_rules! param_layout {
    ($ty:ident { $($field:ident),+ $(,)? }) => {{
        let name = stringify!($ty);
        let mut s = format!(
            "static_assert(sizeof({name}) == {}, \"{name}: size differs from the host's\");\n",
            std::mem::size_of::<$ty>()
        );
        $(
            s += &format!(
                "static_assert(OP_HOST_OFFSETOF({name}, {field}) == {}, \"{name}.{field}: offset differs from the host's\");\n",
                std::mem::offset_of!($ty, $field),
                field = stringify!($field)
            );
        )+
        s
    }};
}
pub(crate) use param_layout;

/// Every kernel file, in the order `outproj kernels` lists them.
pub(crate) static PROGRAMS: [&Program; 5] = [
    &super::linear::PROGRAM,
    &super::layer_norm::PROGRAM,
    &super::attention::PROGRAM,
    &super::alignment_loss::PROGRAM,
    &super::gather_signal_tokens::PROGRAM,
];

/// The environment variable that enables the on-disk CUBIN cache: `1` or `on`
/// for the default folder (`$XDG_CACHE_HOME/output-projector/kernels`, else
/// `~/.cache/output-projector/kernels`), any other non-empty value but `0`/`off`
/// for that folder.
pub const KERNEL_CACHE_ENV: &str = "OUTPROJ_KERNEL_CACHE";

/// Where compiled CUBINs are kept between runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum KernelCache {
    /// As `$OUTPROJ_KERNEL_CACHE` says (off when unset).
    #[default]
    FromEnv,
    /// No disk cache: compile once per process.
    Off,
    /// This folder (created when missing).
    Dir(PathBuf),
}

impl KernelCache {
    /// The folder to use, if any.
    pub fn folder(&self) -> Option<PathBuf> {
        match self {
            KernelCache::Off => None,
            KernelCache::Dir(d) => Some(d.clone()),
            KernelCache::FromEnv => {
                let value = std::env::var_os(KERNEL_CACHE_ENV)?;
                match value.to_str() {
                    Some("" | "0" | "off") => None,
                    Some("1" | "on") => Self::default_folder(),
                    _ => Some(PathBuf::from(value)),
                }
            }
        }
    }

    /// `$XDG_CACHE_HOME/output-projector/kernels`, else
    /// `~/.cache/output-projector/kernels` (what `OUTPROJ_KERNEL_CACHE=1`
    /// means); None when neither variable names a folder.
    pub fn default_folder() -> Option<PathBuf> {
        let base = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .or_else(|| {
                std::env::var_os("HOME")
                    .filter(|h| !h.is_empty())
                    .map(|h| PathBuf::from(h).join(".cache"))
            })?;
        Some(base.join("output-projector").join("kernels"))
    }
}

/// FNV-1a (64 bit) over `parts`, each followed by a separator byte: a stable
/// hash for cache file names (std's hasher may change between Rust versions).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(PRIME);
        }
        h ^= 0xff;
        h = h.wrapping_mul(PRIME);
    }
    h
}

/// The cache file name of `program` compiled from `source` for `arch` by NVRTC
/// `version`: the hash covers the shared header, the source (with the layout
/// checks), the architecture, the NVRTC version and the compile options.
pub(crate) fn cache_file_name(
    program: &Program,
    storage: DType,
    source: &str,
    arch: &str,
    version: (i32, i32),
) -> String {
    let options = compile_options(arch).join(" ");
    let nvrtc = format!("{}.{}", version.0, version.1);
    let hash = fnv1a(&[
        b"output-projector cubin v1",
        COMMON.1.as_bytes(),
        source.as_bytes(),
        arch.as_bytes(),
        nvrtc.as_bytes(),
        options.as_bytes(),
    ]);
    let stem = program.file.trim_end_matches(".cu");
    let stem = if storage == DType::F32 {
        stem.to_string()
    } else {
        format!("{stem}-{}", storage.name())
    };
    format!("{stem}-{arch}-nvrtc{nvrtc}-{hash:016x}.cubin")
}

/// Compiles `program` for `arch` with `storage` and checks that every kernel
/// the host launches is in it.
pub(crate) fn compile_program(program: &Program, storage: DType, arch: &str) -> Result<Compiled> {
    let compiled = compile_with_headers(
        &program.full_source(storage)?,
        program.file,
        arch,
        &[COMMON],
    )?;
    check_entry_points(program, storage, arch, &compiled)?;
    Ok(compiled)
}

/// Every kernel the host launches is in ptxas's report of `compiled`. An
/// empty report passes: a compilation served from the driver's compute cache
/// (`CUDA_CACHE_*`) prints none, and loading the module then names any
/// missing kernel.
fn check_entry_points(
    program: &Program,
    storage: DType,
    arch: &str,
    compiled: &Compiled,
) -> Result<()> {
    if compiled.kernels.is_empty() {
        return Ok(());
    }
    for base in program.kernels_for(storage, arch) {
        let name = format!("{base}{}", kernel_suffix(storage));
        if compiled.kernel(&name).is_none() {
            return Err(Error::Backend {
                backend: "nvrtc".into(),
                message: format!(
                    "kernels/{} compiled for {arch} ({}) has no entry point `{name}`; it has {:?}",
                    program.file,
                    storage.name(),
                    compiled.kernels.iter().map(|k| &k.name).collect::<Vec<_>>()
                ),
            });
        }
    }
    Ok(())
}

type MemoryCache = Mutex<HashMap<(&'static str, DType, String), Arc<Vec<u8>>>>;

/// The CUBIN of `program` for `arch`: from this process's cache, else as
/// [`cubin_from_disk_or_compile`] finds or makes it (then kept in memory).
pub(crate) fn cubin(
    program: &'static Program,
    storage: DType,
    arch: &str,
    disk: Option<&Path>,
) -> Result<Arc<Vec<u8>>> {
    static MEMORY: OnceLock<MemoryCache> = OnceLock::new();
    let memory = MEMORY.get_or_init(Default::default);
    let key = (program.file, storage, arch.to_string());
    if let Some(hit) = memory.lock().ok().and_then(|m| m.get(&key).cloned()) {
        return Ok(hit);
    }
    let bytes = Arc::new(cubin_from_disk_or_compile(program, storage, arch, disk)?);
    if let Ok(mut m) = memory.lock() {
        m.insert(key, Arc::clone(&bytes));
    }
    Ok(bytes)
}

/// The CUBIN of `program` for `arch` from the disk cache in `disk` (when given
/// and the file is an ELF image), else compiled and, with `disk`, stored there.
/// A disk cache that cannot be read or written is skipped, not an error.
pub(crate) fn cubin_from_disk_or_compile(
    program: &Program,
    storage: DType,
    arch: &str,
    disk: Option<&Path>,
) -> Result<Vec<u8>> {
    let path = match disk {
        Some(dir) => {
            let version = probe_nvrtc()?.version;
            Some(dir.join(cache_file_name(
                program,
                storage,
                &program.full_source(storage)?,
                arch,
                version,
            )))
        }
        None => None,
    };
    let from_disk = path
        .as_deref()
        .and_then(|p| std::fs::read(p).ok())
        .filter(|bytes| bytes.len() > 64 && bytes.starts_with(b"\x7fELF"));
    if let Some(bytes) = from_disk {
        return Ok(bytes);
    }
    let compiled = compile_program(program, storage, arch)?;
    if let Some(p) = &path {
        let _ = write_atomically(p, &compiled.cubin);
    }
    Ok(compiled.cubin)
}

/// Writes `bytes` to a temporary file next to `path`, then renames it into place,
/// so a reader never sees half a file.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// What ptxas reported for one kernel file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramReport {
    /// File name under `kernels/`.
    pub file: &'static str,
    /// The storage type it was compiled for (f32, f16 or bf16).
    pub storage: DType,
    /// The architecture it was compiled for, as NVRTC's `--gpu-architecture` takes it
    /// (e.g. `sm_89`; `sm_90a` on sm_90).
    pub arch: String,
    /// Size of the CUBIN, in bytes.
    pub cubin_bytes: usize,
    /// The CUBIN itself (for `cuobjdump -sass`).
    pub cubin: Vec<u8>,
    /// One entry per kernel, in the order ptxas compiled them.
    pub kernels: Vec<KernelReport>,
    /// The compiler's warnings: log lines with `warning`, and ptxas's
    /// "Potential Performance Loss" notes (e.g. "wgmma.mma_async
    /// instructions are serialized").
    pub warnings: Vec<String>,
}

impl ProgramReport {
    /// Stores this CUBIN in the kernel cache folder `dir` under the name a
    /// backend whose [`KernelCache`] is `dir` (or `$OUTPROJ_KERNEL_CACHE=dir`)
    /// looks it up by on a device of this architecture. A deployment fills its
    /// cache ahead of time (`outproj kernels --kernel-cache DIR`) so that no
    /// process pays for the compiles. Returns the file's path.
    pub fn store_in_cache(&self, dir: &Path) -> Result<PathBuf> {
        let program = PROGRAMS
            .iter()
            .find(|p| p.file == self.file)
            .ok_or_else(|| Error::invalid(format!("no kernel file `{}`", self.file)))?;
        let path = dir.join(cache_file_name(
            program,
            self.storage,
            &program.full_source(self.storage)?,
            &self.arch,
            probe_nvrtc()?.version,
        ));
        write_atomically(&path, &self.cubin).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }
}

/// Compiles every kernel file for `arch` (e.g. `sm_90`), once per storage type,
/// and returns ptxas's report of each (file by file, f32 then f16 then bf16):
/// registers, shared memory, stack and spills per kernel. Needs NVRTC, not a
/// GPU. The compilations are independent and take a core each, so they are
/// spread over the machine's cores.
pub fn program_reports(arch: &str) -> Result<Vec<ProgramReport>> {
    let jobs: Vec<(&'static Program, DType)> = PROGRAMS
        .iter()
        .flat_map(|&program| STORAGE_TYPES.iter().map(move |&storage| (program, storage)))
        .collect();
    let compile =
        |&(program, storage): &(&'static Program, DType)| program_report(program, storage, arch);
    crate::parallel::map_in_order(&jobs, compile)
        .map_err(|_| Error::Backend {
            backend: "nvrtc".into(),
            message: "a compilation thread panicked".into(),
        })?
        .into_iter()
        .collect()
}

/// ptxas's report of `program` compiled for `arch` with `storage`.
fn program_report(program: &Program, storage: DType, arch: &str) -> Result<ProgramReport> {
    let compiled = compile_program(program, storage, arch)?;
    if compiled.kernels.is_empty() {
        return Err(Error::Backend {
            backend: "nvrtc".into(),
            message: format!(
                "no ptxas report for kernels/{} ({}, {arch}): the compilation came \
                 from the driver's compute cache; set CUDA_CACHE_DISABLE=1",
                program.file,
                storage.name()
            ),
        });
    }
    Ok(ProgramReport {
        file: program.file,
        storage,
        arch: arch.to_string(),
        cubin_bytes: compiled.cubin.len(),
        cubin: compiled.cubin,
        kernels: compiled.kernels,
        warnings: compiled
            .log
            .lines()
            .filter(|l| {
                l.to_ascii_lowercase().contains("warning") || l.contains("Performance Loss")
            })
            .map(str::to_string)
            .collect(),
    })
}

/// Every kernel of every kernel file compiled for `arch`, as ptxas reports them
/// (see [`program_reports`] for the per-file view).
pub fn kernel_report(arch: &str) -> Result<Vec<KernelReport>> {
    Ok(program_reports(arch)?
        .into_iter()
        .flat_map(|p| p.kernels)
        .collect())
}

/// The names of all kernel files, for messages.
pub fn kernel_files() -> Vec<&'static str> {
    PROGRAMS.iter().map(|p| p.file).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_is_stable_and_separates_parts() {
        // Pinned: a cache written by one build must be found by the next.
        assert_eq!(fnv1a(&[]), 0xcbf2_9ce4_8422_2325);
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
        assert_eq!(fnv1a(&[b"abc"]), fnv1a(&[b"abc"]));
    }

    #[test]
    fn cache_names_differ_by_arch_version_and_source() {
        let p = &super::super::linear::PROGRAM;
        let src = p.full_source(DType::F32).unwrap();
        let a = cache_file_name(p, DType::F32, &src, "sm_90", (13, 0));
        assert!(
            a.starts_with("linear-sm_90-nvrtc13.0-") && a.ends_with(".cubin"),
            "{a}"
        );
        assert_ne!(a, cache_file_name(p, DType::F32, &src, "sm_80", (13, 0)));
        assert_ne!(a, cache_file_name(p, DType::F32, &src, "sm_90", (13, 1)));
        assert_ne!(
            a,
            cache_file_name(p, DType::F32, &format!("{src} "), "sm_90", (13, 0))
        );
        let half = p.full_source(DType::BF16).unwrap();
        let b = cache_file_name(p, DType::BF16, &half, "sm_90", (13, 0));
        assert!(b.starts_with("linear-bf16-sm_90-nvrtc13.0-"), "{b}");
        assert_ne!(b, cache_file_name(p, DType::F16, &half, "sm_90", (13, 0)));
    }

    #[test]
    fn entry_points_are_checked_against_a_report_when_there_is_one() {
        let p = &super::super::linear::PROGRAM;
        let report = |names: &[&str]| Compiled {
            cubin: Vec::new(),
            kernels: names
                .iter()
                .map(|n| KernelReport {
                    name: n.to_string(),
                    ..KernelReport::default()
                })
                .collect(),
            log: String::new(),
        };
        // A cached compilation prints no report: the module load checks.
        assert!(check_entry_points(p, DType::F32, "sm_90", &report(&[])).is_ok());
        let all: Vec<_> = p.kernels_for(DType::F32, "sm_90").collect();
        assert!(check_entry_points(p, DType::F32, "sm_90", &report(&all)).is_ok());
        let err = check_entry_points(p, DType::F32, "sm_90", &report(&all[1..])).unwrap_err();
        assert!(err.to_string().contains(all[0]), "{err}");
    }

    #[test]
    fn arch_numbers() {
        assert_eq!(arch_number("sm_80"), Some(80));
        assert_eq!(arch_number("sm_90a"), Some(90));
        assert_eq!(arch_number("sm_120"), Some(120));
        assert_eq!(arch_number("compute_90"), None);
        assert_eq!(arch_number("sm_"), None);
        // Never TF32 below sm_80 or for 16-bit storage, headers or not.
        assert!(!tf32_compiled(DType::F32, "sm_75"));
        assert!(!tf32_compiled(DType::BF16, "sm_90"));
    }

    #[test]
    fn kernel_cache_setting() {
        assert_eq!(KernelCache::Off.folder(), None);
        assert_eq!(
            KernelCache::Dir("/tmp/x".into()).folder(),
            Some(PathBuf::from("/tmp/x"))
        );
    }

    /// Compiles for sm_80 into an empty folder, then shows the file is what a
    /// second call reads, and that a damaged file is replaced.
    /// Whether NVRTC is here; if not, says so in one line, or fails the test
    /// where `REQUIRE_NVRTC=1` (CI).
    fn nvrtc_or_skip() -> bool {
        if super::super::nvrtc_present() {
            return true;
        }
        assert!(
            std::env::var("REQUIRE_NVRTC").as_deref() != Ok("1"),
            "REQUIRE_NVRTC=1 but NVRTC is missing"
        );
        println!("skipped: nvrtc unavailable");
        false
    }

    #[test]
    fn disk_cache_round_trip() {
        if !nvrtc_or_skip() {
            return;
        }
        let dir = std::env::temp_dir().join(format!("outproj-cubin-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let p = &super::super::gather_signal_tokens::PROGRAM;
        let first = cubin_from_disk_or_compile(p, DType::F32, "sm_80", Some(&dir)).unwrap();
        assert!(first.starts_with(b"\x7fELF"));
        let files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");
        assert_eq!(std::fs::read(&files[0]).unwrap(), first);
        // A file in the cache is used as it is...
        let mut planted = b"\x7fELF".to_vec();
        planted.resize(100, 7);
        std::fs::write(&files[0], &planted).unwrap();
        assert_eq!(
            cubin_from_disk_or_compile(p, DType::F32, "sm_80", Some(&dir)).unwrap(),
            planted
        );
        // ...unless it is not an ELF image: then it is compiled and rewritten.
        std::fs::write(&files[0], b"garbage").unwrap();
        assert_eq!(
            cubin_from_disk_or_compile(p, DType::F32, "sm_80", Some(&dir)).unwrap(),
            first
        );
        assert_eq!(std::fs::read(&files[0]).unwrap(), first);
        // A report stored ahead of time lands where the lookup reads.
        let report = ProgramReport {
            cubin: planted.clone(),
            ..program_report(p, DType::F32, "sm_80").unwrap()
        };
        assert_eq!(report.store_in_cache(&dir).unwrap(), files[0]);
        assert_eq!(
            cubin_from_disk_or_compile(p, DType::F32, "sm_80", Some(&dir)).unwrap(),
            planted
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A host struct that drifts from the kernel's is a compile error.
    #[test]
    fn a_layout_mismatch_fails_to_compile() {
        if !nvrtc_or_skip() {
            return;
        }
        fn wrong() -> String {
            "static_assert(OP_HOST_OFFSETOF(GatherParams, out) == 16, \
             \"GatherParams.out: offset differs from the host's\");\n"
                .to_string()
        }
        static WRONG: Program = Program {
            file: "gather_signal_tokens.cu",
            source: include_str!("../../kernels/gather_signal_tokens.cu"),
            kernels: &["gather_signal_tokens_naive"],
            f32_kernels: &[],
            half_kernels: &[],
            tf32_kernels: &[],
            wgmma_kernels: &[],
            layouts: wrong,
        };
        let err = compile_program(&WRONG, DType::F32, "sm_80")
            .unwrap_err()
            .to_string();
        assert!(err.contains("GatherParams.out: offset differs"), "{err}");
    }

    /// Kernels may be queued with programmatic dependent launch, so each must
    /// wait for its predecessor before it touches memory: the first statement
    /// of every entry point is `dependent_launch_prologue()`, or, in the
    /// GEMMs, `dependent_launch_prologue(..)` with the L2 prefetch of the
    /// block's weights before the wait.
    #[test]
    fn every_kernel_starts_by_waiting_for_its_predecessor() {
        for p in PROGRAMS {
            let mut entries = 0;
            for (i, _) in p.source.match_indices("__global__") {
                let body = &p.source[i..];
                let open = body.find('{').map(|b| b + 1).unwrap_or(body.len());
                let first = body[open..].trim_start();
                assert!(
                    first.starts_with("dependent_launch_prologue();")
                        || ["(p, ", "(p.linear, "].iter().any(|args| {
                            first.starts_with(&format!(
                                "dependent_launch_prologue([&] {{ linear_prefetch_w{args}"
                            ))
                        }),
                    "{}: an entry point starts with {:?}",
                    p.file,
                    first.lines().next().unwrap_or("")
                );
                entries += 1;
            }
            let listed = p.kernels.len()
                + p.f32_kernels.len()
                + p.half_kernels.len()
                + p.tf32_kernels.len()
                + p.wgmma_kernels.len();
            assert!(entries >= listed, "{}: {entries} entry points", p.file);
        }
        let common = COMMON.1;
        assert!(common.contains("griddepcontrol.wait;"));
        assert!(common.contains("griddepcontrol.launch_dependents;"));
    }

    #[test]
    fn every_program_lists_kernels_and_layouts() {
        for p in PROGRAMS {
            assert!(!p.kernels.is_empty(), "{}", p.file);
            assert!(p.source.contains("#include \"common.cuh\""), "{}", p.file);
            let layouts = (p.layouts)();
            assert!(layouts.contains("static_assert(sizeof("), "{}", p.file);
            for k in p
                .kernels
                .iter()
                .chain(p.f32_kernels)
                .chain(p.half_kernels)
                .chain(p.tf32_kernels)
                .chain(p.wgmma_kernels)
            {
                assert!(
                    p.source.contains(&format!("OP_KERNEL_NAME({k})(const ")),
                    "{}: no kernel `{k}`",
                    p.file
                );
            }
        }
    }
}
