//! Thread-per-core: the data plane runs one single-threaded runtime per worker, each
//! with listeners of its own on every proxy port (`SO_REUSEPORT`, so the kernel spreads
//! new connections over the workers) and connection pools of its own. A connection,
//! the HBONE tunnel or upstream HTTP connection it rides, and that connection's HTTP/2
//! task are then all served by one thread, and passing bytes between them never wakes
//! another thread.

use std::{cell::Cell, fmt};

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// Marks the calling thread as data-plane worker `index`.
pub fn enter(index: usize) {
    INDEX.set(index);
}

/// One `T` for each worker.
pub struct PerWorker<T>(Box<[T]>);

impl<T> PerWorker<T> {
    /// `workers` values (at least one) made by `make`.
    pub fn new(workers: usize, make: impl FnMut() -> T) -> Self {
        Self(std::iter::repeat_with(make).take(workers.max(1)).collect())
    }

    /// The calling worker's own; the first worker's on a thread that is no worker (the
    /// control thread, tests).
    pub fn here(&self) -> &T {
        &self.0[INDEX.get() % self.0.len()]
    }

    /// Every worker's.
    pub fn iter(&self) -> std::slice::Iter<'_, T> {
        self.0.iter()
    }
}

impl<T: fmt::Debug> fmt::Debug for PerWorker<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_worker_thread_gets_its_own_value_and_other_threads_the_first() {
        let counters = PerWorker::new(3, || std::sync::atomic::AtomicUsize::new(0));
        std::thread::scope(|scope| {
            for index in 0..3 {
                let counters = &counters;
                scope.spawn(move || {
                    enter(index);
                    counters
                        .here()
                        .fetch_add(index + 1, std::sync::atomic::Ordering::Relaxed);
                });
            }
        });
        counters
            .here()
            .fetch_add(10, std::sync::atomic::Ordering::Relaxed);
        let values: Vec<usize> = counters
            .iter()
            .map(|counter| counter.load(std::sync::atomic::Ordering::Relaxed))
            .collect();
        assert_eq!(values, [11, 2, 3]);
        assert_eq!(PerWorker::new(0, || ()).iter().count(), 1, "at least one");
    }
}
