//! Work spread over the machine's cores (NVRTC compiles, emulator runs).

use std::sync::atomic::{AtomicUsize, Ordering};

/// `f` of each of `items`, on as many threads as the machine has cores (each takes
/// the next item when it is done with one), the results in the items' order. A
/// panic in `f` comes back as the `Err` of [`std::thread::Result`].
pub fn map_in_order<T: Sync, R: Send>(
    items: &[T],
    f: impl Fn(&T) -> R + Sync,
) -> std::thread::Result<Vec<R>> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let next = AtomicUsize::new(0);
    let mut done: Vec<(usize, R)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers.min(items.len()))
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(i) else {
                            return mine;
                        };
                        mine.push((i, f(item)));
                    }
                })
            })
            .collect();
        let mut done = Vec::with_capacity(items.len());
        for h in handles {
            done.extend(h.join()?);
        }
        Ok(done)
    })?;
    done.sort_by_key(|(i, _)| *i);
    Ok(done.into_iter().map(|(_, r)| r).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_keep_the_items_order_and_a_panic_is_an_error() {
        let items: Vec<u64> = (0..100).collect();
        let squares = map_in_order(&items, |&i| i * i).unwrap();
        assert_eq!(squares, items.iter().map(|i| i * i).collect::<Vec<_>>());
        assert!(map_in_order(&[] as &[u8], |_| ()).unwrap().is_empty());
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let r = map_in_order(&items, |&i| assert!(i != 50));
        std::panic::set_hook(hook);
        assert!(r.is_err());
    }
}
