//! Named ranges for profilers. With the `nvtx` cargo feature each range is an
//! NVTX push/pop range: Nsight Systems (`nsys profile --trace=cuda,nvtx`) shows
//! the projector's forward, its layers and every op on the CPU timeline and,
//! projected, over the GPU work they launched. Without the feature a range is
//! an empty value and its name is never formatted.

/// An open range; it ends when dropped.
#[must_use = "a range ends when dropped: bind it to a variable"]
pub struct Range {
    #[cfg(feature = "nvtx")]
    _range: nvtx::LocalRange,
}

/// Opens the range `name` on this thread.
#[inline]
pub fn range(name: &str) -> Range {
    #[cfg(feature = "nvtx")]
    {
        Range {
            _range: nvtx::LocalRange::new(nvtx::Str::from_str_lossy(name)),
        }
    }
    #[cfg(not(feature = "nvtx"))]
    {
        let _ = name;
        Range {}
    }
}

/// Opens a range whose name `name` makes, only when ranges are recorded.
#[inline]
pub fn range_with(name: impl FnOnce() -> String) -> Range {
    #[cfg(feature = "nvtx")]
    {
        range(&name())
    }
    #[cfg(not(feature = "nvtx"))]
    {
        let _ = name;
        Range {}
    }
}

/// Whether ranges are recorded in this build.
pub const ENABLED: bool = cfg!(feature = "nvtx");

#[cfg(test)]
mod tests {
    #[test]
    fn ranges_nest_and_end() {
        let outer = super::range("outer");
        for i in 0..3 {
            let _inner = super::range_with(|| format!("inner {i}"));
        }
        drop(outer);
    }
}
