//! Flow events from the kernel programs' ring buffer, as records the agent can log,
//! count and (later) stream to the CLI.

use std::net::SocketAddr;

use aya::maps::{MapData, RingBuf};
use serde::Serialize;
use tokio::io::{Interest, unix::AsyncFd};
use weft_common::{FlowEvent, flow, names, reason};

use super::{Datapath, DatapathError, socket_addr, take_map};

/// A flow event in the form operators read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Flow {
    /// Nanoseconds since boot, from the kernel.
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
}

impl From<&FlowEvent> for Flow {
    fn from(event: &FlowEvent) -> Self {
        Flow {
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
                _ => "unknown",
            },
            source: socket_addr(&event.source),
            destination: socket_addr(&event.destination),
            netns_cookie: event.netns_cookie,
            ifindex: event.ifindex,
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
                while let Some(item) = ring.next() {
                    if item.len() >= size_of::<FlowEvent>() {
                        // SAFETY: the kernel wrote a whole FlowEvent; read_unaligned
                        // copes with the ring buffer's 8-byte alignment.
                        let event = unsafe { item.as_ptr().cast::<FlowEvent>().read_unaligned() };
                        on_flow(Flow::from(&event));
                    }
                }
                ready.clear_ready();
            }
        });
        Ok(())
    }
}
