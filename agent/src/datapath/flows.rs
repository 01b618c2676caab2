//! Flow events from the kernel programs' ring buffer, as records the agent can log,
//! count and stream to watchers ([`crate::observe`]).

use std::{
    net::SocketAddr,
    time::{Duration, SystemTime},
};

use aya::maps::{MapData, RingBuf};
use serde::Serialize;
use tokio::io::{Interest, unix::AsyncFd};
use weft_common::{FlowEvent, flow, names, reason};

use super::{Datapath, DatapathError, socket_addr, take_map};

/// A flow event in the form operators read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Flow {
    /// When the kernel saw it, in wall-clock time: RFC 3339, UTC, microseconds.
    pub time: String,
    /// When the kernel saw it: `bpf_ktime_get_ns`, CLOCK_MONOTONIC (nanoseconds since
    /// boot, not counting suspend).
    pub timestamp_ns: u64,
    pub verdict: &'static str,
    pub reason: &'static str,
    /// Unknown (unspecified address) for outbound events: connect() has no source yet.
    pub source: SocketAddr,
    pub destination: SocketAddr,
    /// The client pod's network-namespace cookie (outbound events).
    pub netns_cookie: u64,
    /// The pod's host-side interface.
    pub ifindex: u32,
    /// [`Flow::time`] as it was read.
    #[serde(skip)]
    pub wall_time: SystemTime,
}

impl Flow {
    /// The operators' form of `event`, its time read against `clocks`.
    fn new(event: &FlowEvent, clocks: &Clocks) -> Self {
        let wall_time = clocks.wall_time(event.timestamp_ns);
        Flow {
            time: format_time(wall_time),
            wall_time,
            timestamp_ns: event.timestamp_ns,
            verdict: match event.verdict {
                flow::REDIRECT => "redirect",
                flow::DROP => "drop",
                flow::PASS => "pass",
                _ => "unknown",
            },
            reason: match event.reason {
                reason::MESH_DESTINATION => "mesh_destination",
                reason::NOT_MESH_DESTINATION => "not_mesh_destination",
                reason::EXCLUDED_PORT => "excluded_port",
                reason::STRICT_PLAINTEXT => "strict_plaintext",
                reason::PERMISSIVE_PLAINTEXT => "permissive_plaintext",
                reason::POLICY_PLAINTEXT => "policy_plaintext",
                _ => "unknown",
            },
            source: socket_addr(&event.source),
            destination: socket_addr(&event.destination),
            netns_cookie: event.netns_cookie,
            ifindex: event.ifindex,
        }
    }
}

/// `time` as [`Flow::time`] gives it: RFC 3339 in UTC with microseconds, such as
/// `2026-03-01T12:00:00.250000Z`, so that sorting the text sorts the times.
pub fn format_time(time: SystemTime) -> String {
    match jiff::Timestamp::try_from(time) {
        Ok(time) => format!("{time:.6}"),
        Err(_) => String::new(),
    }
}

/// CLOCK_MONOTONIC (the kernel's flow timestamps) and wall-clock time read together,
/// to turn one into the other. Their offset moves when the wall clock is set, so it is
/// read afresh for each batch of events.
#[derive(Clone, Copy, Debug)]
struct Clocks {
    monotonic_ns: u64,
    wall: SystemTime,
}

impl Clocks {
    fn now() -> Clocks {
        let mut monotonic = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec into `monotonic`, which outlives
        // the call; CLOCK_MONOTONIC always exists on Linux.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut monotonic) };
        Clocks {
            monotonic_ns: Duration::new(monotonic.tv_sec as u64, monotonic.tv_nsec as u32)
                .as_nanos() as u64,
            wall: SystemTime::now(),
        }
    }

    /// The wall-clock time of the CLOCK_MONOTONIC instant `monotonic_ns`.
    fn wall_time(&self, monotonic_ns: u64) -> SystemTime {
        if monotonic_ns <= self.monotonic_ns {
            self.wall - Duration::from_nanos(self.monotonic_ns - monotonic_ns)
        } else {
            self.wall + Duration::from_nanos(monotonic_ns - self.monotonic_ns)
        }
    }
}

impl Datapath {
    /// Calls `on_flow` for every flow event, from a task on the current tokio runtime.
    pub fn forward_flows(
        &mut self,
        mut on_flow: impl FnMut(Flow) + Send + 'static,
    ) -> Result<(), DatapathError> {
        let ring: RingBuf<MapData> = take_map(&mut self.ebpf, names::FLOWS)?;
        // SAFETY: the AsyncFd owns the ring buffer, and with it the descriptor, for as
        // long as it is registered.
        let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|err| DatapathError::Log(err.to_string()))?;
        tokio::spawn(async move {
            while let Ok(mut ready) = ring.readable_mut().await {
                let ring = ready.get_inner_mut();
                let clocks = Clocks::now();
                while let Some(item) = ring.next() {
                    if item.len() >= size_of::<FlowEvent>() {
                        // SAFETY: the kernel wrote a whole FlowEvent; read_unaligned
                        // copes with the ring buffer's 8-byte alignment.
                        let event = unsafe { item.as_ptr().cast::<FlowEvent>().read_unaligned() };
                        on_flow(Flow::new(&event, &clocks));
                    }
                }
                ready.clear_ready();
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_timestamps_become_wall_clock_time() {
        let clocks = Clocks {
            monotonic_ns: 5_000_000_000,
            wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_772_366_400),
        };
        // 1.75 s before the clocks were read, and (another CPU's event) 1 µs after.
        assert_eq!(
            format_time(clocks.wall_time(3_250_000_000)),
            "2026-03-01T11:59:58.250000Z"
        );
        assert_eq!(
            format_time(clocks.wall_time(5_000_001_000)),
            "2026-03-01T12:00:00.000001Z"
        );
    }

    #[test]
    fn the_clocks_agree_with_the_kernel_and_the_wall() {
        let before = SystemTime::now();
        let clocks = Clocks::now();
        // The monotonic clock of the same moment, read again, is a moment later.
        let again = Clocks::now();
        assert!(again.monotonic_ns >= clocks.monotonic_ns);
        let wall = clocks.wall_time(clocks.monotonic_ns);
        assert!(before <= wall && wall <= SystemTime::now());
    }

    #[test]
    fn flow_records_carry_both_times() {
        let clocks = Clocks {
            monotonic_ns: 2_000_000_000,
            wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_772_366_400),
        };
        let event = FlowEvent {
            timestamp_ns: 1_500_000_000,
            verdict: flow::DROP,
            reason: reason::STRICT_PLAINTEXT,
            ..FlowEvent::default()
        };
        let json = serde_json::to_value(Flow::new(&event, &clocks)).unwrap();
        assert_eq!(json["time"], "2026-03-01T11:59:59.500000Z");
        assert_eq!(json["timestamp_ns"], 1_500_000_000);
        assert_eq!(json["verdict"], "drop");
        assert_eq!(json["reason"], "strict_plaintext");
    }
}
