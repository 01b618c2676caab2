//! Documents of the agent's admin endpoint that tools read back (`weftctl`): the agent
//! writes them with these types and the readers parse them with the same ones.

use serde::{Deserialize, Serialize};

/// One workload certificate the agent holds, in `GET /certs`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    /// The SPIFFE ID it proves.
    pub identity: String,
    /// Its serial number, in hexadecimal.
    pub serial: String,
    /// Its validity, in seconds since the Unix epoch.
    pub not_before: u64,
    pub not_after: u64,
    /// The subject of its issuer.
    pub issuer: String,
    /// The subject of the root it leads to, when the CA said so.
    pub root: Option<String>,
}
