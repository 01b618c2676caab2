//! What each TLS path negotiated, read off the wire: the benchmark captures the first
//! packets between the nodes (tcpdump on the fabric bridge) while it checks the paths,
//! and reads the TLS version, cipher suite and key-exchange group from each ServerHello,
//! which TLS 1.3 still sends in the clear. That is how the results show that weft and the
//! references were held to the same cipher, rather than assuming it.

use std::collections::BTreeMap;

use serde::Serialize;

/// What a server chose, from its ServerHello.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Negotiated {
    pub version: String,
    pub cipher_suite: String,
    pub group: String,
}

/// The ServerHello of every TCP source port in a pcap capture (Ethernet, IPv4), the
/// first one per port.
pub fn server_hellos(pcap: &[u8]) -> BTreeMap<u16, Negotiated> {
    let mut found = BTreeMap::new();
    for frame in frames(pcap) {
        let Some((port, payload)) = tcp_payload(frame) else {
            continue;
        };
        if found.contains_key(&port) {
            continue;
        }
        if let Some(hello) = server_hello(payload) {
            found.insert(port, hello);
        }
    }
    found
}

/// The frames of a classic pcap file (either byte order, microsecond or nanosecond).
fn frames(pcap: &[u8]) -> Vec<&[u8]> {
    let mut frames = Vec::new();
    let Some(magic) = pcap.get(..4) else {
        return frames;
    };
    let little = match magic {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
        _ => return frames,
    };
    let u32_at = |at: usize| -> Option<u32> {
        let bytes: [u8; 4] = pcap.get(at..at + 4)?.try_into().ok()?;
        Some(if little {
            u32::from_le_bytes(bytes)
        } else {
            u32::from_be_bytes(bytes)
        })
    };
    // Link type 1: Ethernet.
    if u32_at(20) != Some(1) {
        return frames;
    }
    let mut at = 24;
    while let Some(captured) = u32_at(at + 8) {
        let start = at + 16;
        let Some(frame) = pcap.get(start..start + captured as usize) else {
            break;
        };
        frames.push(frame);
        at = start + captured as usize;
    }
    frames
}

/// The TCP source port and payload of an Ethernet frame carrying IPv4.
fn tcp_payload(frame: &[u8]) -> Option<(u16, &[u8])> {
    if frame.get(12..14)? != [0x08, 0x00] {
        return None;
    }
    let ip = frame.get(14..)?;
    let header = usize::from(ip.first()? & 0x0f) * 4;
    if *ip.get(9)? != 6 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
    let tcp = ip.get(header..total.min(ip.len()))?;
    let port = u16::from_be_bytes([*tcp.first()?, *tcp.get(1)?]);
    let offset = usize::from(tcp.get(12)? >> 4) * 4;
    Some((port, tcp.get(offset..)?))
}

/// A ServerHello at the start of `payload` (a TLS handshake record).
fn server_hello(payload: &[u8]) -> Option<Negotiated> {
    // Record: type 22 (handshake), version, length; then handshake type 2, length.
    if *payload.first()? != 22 || *payload.get(5)? != 2 {
        return None;
    }
    let body = payload.get(9..)?;
    // legacy_version (2), random (32), session id (length-prefixed), cipher suite (2),
    // compression (1), extensions (length-prefixed).
    let session = usize::from(*body.get(34)?);
    let mut at = 35 + session;
    let suite = u16::from_be_bytes([*body.get(at)?, *body.get(at + 1)?]);
    at += 3;
    let extensions_len = usize::from(u16::from_be_bytes([*body.get(at)?, *body.get(at + 1)?]));
    let extensions = body.get(at + 2..(at + 2 + extensions_len).min(body.len()))?;
    let mut version = u16::from_be_bytes([*body.first()?, *body.get(1)?]);
    let mut group = None;
    let mut at = 0;
    while let Some(header) = extensions.get(at..at + 4) {
        let kind = u16::from_be_bytes([header[0], header[1]]);
        let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
        let data = extensions.get(at + 4..at + 4 + len).unwrap_or_default();
        match kind {
            // supported_versions: the version the server selected.
            0x002b if data.len() >= 2 => version = u16::from_be_bytes([data[0], data[1]]),
            // key_share: the server's share, named by its group.
            0x0033 if data.len() >= 2 => group = Some(u16::from_be_bytes([data[0], data[1]])),
            _ => {}
        }
        at += 4 + len;
    }
    Some(Negotiated {
        version: match version {
            0x0304 => "TLS 1.3".to_owned(),
            0x0303 => "TLS 1.2".to_owned(),
            other => format!("0x{other:04x}"),
        },
        cipher_suite: match suite {
            0x1301 => "TLS_AES_128_GCM_SHA256".to_owned(),
            0x1302 => "TLS_AES_256_GCM_SHA384".to_owned(),
            0x1303 => "TLS_CHACHA20_POLY1305_SHA256".to_owned(),
            other => format!("0x{other:04x}"),
        },
        group: match group {
            Some(0x001d) => "x25519".to_owned(),
            Some(0x0017) => "secp256r1".to_owned(),
            Some(0x0018) => "secp384r1".to_owned(),
            Some(0x11ec) => "X25519MLKEM768".to_owned(),
            Some(0x11eb) => "SecP256r1MLKEM768".to_owned(),
            Some(0x0201) => "MLKEM768".to_owned(),
            Some(other) => format!("0x{other:04x}"),
            None => "none (resumed without a key share)".to_owned(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pcap file with one Ethernet/IPv4/TCP frame from `port` carrying `payload`.
    fn capture(port: u16, payload: &[u8]) -> Vec<u8> {
        let mut tcp = vec![0u8; 20];
        tcp[..2].copy_from_slice(&port.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp.extend_from_slice(payload);
        let mut ip = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, 6, 0, 0, 10, 99, 0, 2, 10, 99, 0, 1,
        ];
        let total = (ip.len() + tcp.len()) as u16;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&tcp);
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&[0x08, 0x00]);
        frame.extend_from_slice(&ip);
        let mut pcap = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0];
        pcap.extend_from_slice(&[0; 8]);
        pcap.extend_from_slice(&65535u32.to_le_bytes());
        pcap.extend_from_slice(&1u32.to_le_bytes());
        pcap.extend_from_slice(&[0; 8]);
        pcap.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        pcap.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        pcap.extend_from_slice(&frame);
        pcap
    }

    /// A TLS 1.3 ServerHello choosing `suite` with a key share of `group`.
    fn hello(suite: u16, group: u16) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7; 32]);
        body.push(32);
        body.extend_from_slice(&[9; 32]);
        body.extend_from_slice(&suite.to_be_bytes());
        body.push(0);
        let mut extensions = vec![0x00, 0x2b, 0x00, 0x02, 0x03, 0x04];
        extensions.extend_from_slice(&[0x00, 0x33, 0x00, 0x24]);
        extensions.extend_from_slice(&group.to_be_bytes());
        extensions.extend_from_slice(&[0x00, 0x20]);
        extensions.extend_from_slice(&[5; 32]);
        body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
        body.extend_from_slice(&extensions);
        let mut handshake = vec![2, 0];
        handshake.extend_from_slice(&(body.len() as u16).to_be_bytes());
        handshake.extend_from_slice(&body);
        let mut record = vec![22, 0x03, 0x03];
        record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
        record.extend_from_slice(&handshake);
        record
    }

    #[test]
    fn reads_the_server_hello_off_the_wire() {
        let pcap = capture(15008, &hello(0x1302, 0x001d));
        let found = server_hellos(&pcap);
        assert_eq!(
            found.get(&15008),
            Some(&Negotiated {
                version: "TLS 1.3".to_owned(),
                cipher_suite: "TLS_AES_256_GCM_SHA384".to_owned(),
                group: "x25519".to_owned(),
            })
        );
        let hybrid = server_hellos(&capture(17443, &hello(0x1301, 0x11ec)));
        assert_eq!(hybrid[&17443].cipher_suite, "TLS_AES_128_GCM_SHA256");
        assert_eq!(hybrid[&17443].group, "X25519MLKEM768");
    }

    #[test]
    fn ignores_what_is_not_a_server_hello() {
        // A ClientHello (handshake type 1), application data, and garbage.
        let mut client_hello = hello(0x1302, 0x001d);
        client_hello[5] = 1;
        assert!(server_hellos(&capture(15008, &client_hello)).is_empty());
        assert!(server_hellos(&capture(15008, &[23, 3, 3, 0, 5, 1, 2, 3, 4, 5])).is_empty());
        assert!(server_hellos(b"not a pcap file").is_empty());
        let mut truncated = capture(15008, &hello(0x1302, 0x001d));
        truncated.truncate(truncated.len() - 40);
        assert!(server_hellos(&truncated).is_empty());
    }
}
