//! The agent's own CPU time, memory and open files (`weft_process_*`), read from
//! `/proc/self` (and the allocator) at each scrape: what the agent costs its node,
//! without a kubelet's cAdvisor. CPU time is a gauge of seconds, not Prometheus' usual
//! `process_cpu_seconds_total` counter: the metrics crate's counters hold integers.

use std::fs;

/// Sets the `weft_process_*` series from `/proc/self`; a file that cannot be read leaves
/// its series as they were.
pub fn record() {
    if let Some(cpu) = fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| cpu_ticks(&stat))
    {
        let ticks_per_second = clock_ticks_per_second();
        metrics::gauge!("weft_process_cpu_seconds").set(cpu as f64 / ticks_per_second);
    }
    if let Some(pages) = fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|statm| resident_pages(&statm))
    {
        metrics::gauge!("weft_process_resident_memory_bytes").set((pages * page_size()) as f64);
    }
    if let Some(bytes) = crate::memory::in_use() {
        metrics::gauge!("weft_process_heap_in_use_bytes").set(bytes as f64);
    }
    if let Ok(fds) = fs::read_dir("/proc/self/fd") {
        metrics::gauge!("weft_process_open_fds").set(fds.count() as f64);
    }
}

pub fn describe() {
    metrics::describe_gauge!(
        "weft_process_cpu_seconds",
        "CPU time the agent spent since it started, user and system, in seconds"
    );
    metrics::describe_gauge!(
        "weft_process_resident_memory_bytes",
        "The agent's resident memory, in bytes"
    );
    metrics::describe_gauge!(
        "weft_process_heap_in_use_bytes",
        "Memory the agent's allocator has handed out and not had back, in bytes: its \
         data, without the free memory the allocator keeps resident"
    );
    metrics::describe_gauge!(
        "weft_process_open_fds",
        "File descriptors the agent holds open"
    );
}

/// User plus system time in clock ticks, from `/proc/<pid>/stat` (fields 14 and 15,
/// counted after the command name, which may hold spaces and parentheses).
fn cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user + system)
}

/// Resident pages, the second field of `/proc/<pid>/statm`.
fn resident_pages(statm: &str) -> Option<u64> {
    statm.split_whitespace().nth(1)?.parse().ok()
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf reads a constant of the running system.
    match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        ticks if ticks > 0 => ticks as f64,
        _ => 100.0,
    }
}

fn page_size() -> u64 {
    // SAFETY: as above.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        size if size > 0 => size as u64,
        _ => 4096,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_past_a_name_with_spaces_and_parentheses() {
        let stat = "4242 (weft (agent) x) S 1 4242 4242 0 -1 4194560 2730 0 0 0 157 43 0 0 20 0 9 0 1234 1000 500";
        assert_eq!(cpu_ticks(stat), Some(200));
        assert_eq!(cpu_ticks("garbage"), None);
        assert_eq!(resident_pages("8000 1234 567 10 0 900 0\n"), Some(1234));
        assert_eq!(resident_pages(""), None);
    }

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let stat = fs::read_to_string("/proc/self/stat").unwrap();
        assert!(cpu_ticks(&stat).is_some(), "{stat}");
        let statm = fs::read_to_string("/proc/self/statm").unwrap();
        assert!(resident_pages(&statm).unwrap() > 0, "{statm}");
    }
}
