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
    use super::{range, range_with, Range, ENABLED};
    use std::cell::RefCell;

    #[test]
    fn ranges_nest_and_end() {
        // What happens, in order: a range's name is made when it opens (with the
        // feature) and never otherwise; the code inside each range runs once.
        let log = RefCell::new(Vec::<String>::new());
        let note = |what: String| log.borrow_mut().push(what);
        let outer = range_with(|| {
            note("name outer".into());
            "outer".into()
        });
        for i in 0..3 {
            let _inner = range_with(|| {
                note(format!("name inner {i}"));
                format!("inner {i}")
            });
            let _leaf = range(&format!("leaf {i}"));
            note(format!("body {i}"));
        }
        drop(outer);
        let mut want = Vec::new();
        if ENABLED {
            want.push("name outer".to_string());
        }
        for i in 0..3 {
            if ENABLED {
                want.push(format!("name inner {i}"));
            }
            want.push(format!("body {i}"));
        }
        assert_eq!(log.into_inner(), want, "nvtx feature on: {ENABLED}");
        assert_eq!(ENABLED, cfg!(feature = "nvtx"));
        // Without the feature a range is an empty value.
        if !ENABLED {
            assert_eq!(std::mem::size_of::<Range>(), 0);
        }
    }

    #[test]
    fn names_nvtx_cannot_hold_do_not_panic() {
        // Interior NULs end a C string: the range drops them instead of failing.
        let _a = range("a\0b");
        let _b = range_with(|| "\0".repeat(3));
        let _c = range("");
        let _d = range_with(|| "x".repeat(1 << 16));
    }
}
