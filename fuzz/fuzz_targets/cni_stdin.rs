//! The CNI plugin's stdin: the network configuration the runtime passes, for each
//! command (the first byte picks it), with an agent that accepts every request. The
//! plugin must answer or fail with a CNI error, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_api::enroll::{Reply, Request};
use weft_cni::{AgentClient, AgentError, Endpoint, Env};

struct Accepting;

impl AgentClient for Accepting {
    fn exchange(&self, _: &Endpoint, _: &Request) -> Result<Reply, AgentError> {
        Ok(Reply::Ok { meshed: true })
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&command, mut stdin)) = input.split_first() else {
        return;
    };
    let command = ["ADD", "DEL", "CHECK", "VERSION"][usize::from(command % 4)];
    let env = Env {
        command: Some(command.to_owned()),
        container_id: Some("fuzz".to_owned()),
        netns: Some("/var/run/netns/fuzz".to_owned()),
        ifname: Some("eth0".to_owned()),
        args: Some("K8S_POD_NAMESPACE=default;K8S_POD_NAME=fuzz".to_owned()),
    };
    let _ = weft_cni::run(&env, &mut stdin, &Accepting);
});
