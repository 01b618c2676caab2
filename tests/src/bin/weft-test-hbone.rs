//! An HBONE client for tests that need to misbehave where a weft agent would not: a
//! chosen client identity, a chosen SNI, a chosen expected server identity, any target.
//! Prints one line: `status 200 <first line of the target's answer>`, `refused <code>`
//! or `error <message>`.
//!
//! Usage: `weft-test-hbone <trust bundle> <certs dir> <source id> <sni id> <expected
//! server id> <agent ip:port> <target ip:port>`

use std::{net::SocketAddr, path::PathBuf};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;
use weft_agent::{
    identity::Identity,
    proxy::hbone::{HboneError, Pool, Settings},
    tls::{self, CertStore},
};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [bundle, certs, source, sni, expected, agent, target] = args.as_slice() else {
        eprintln!(
            "usage: weft-test-hbone <bundle> <certs dir> <source> <sni> <expected> <agent> <target>"
        );
        std::process::exit(2);
    };
    let parse =
        |text: &str| -> Identity { text.parse().unwrap_or_else(|err| panic!("{text}: {err}")) };
    let (source, sni, expected) = (parse(source), parse(sni), parse(expected));
    let agent: SocketAddr = agent.parse().expect("agent address");
    let target: SocketAddr = target.parse().expect("target address");
    let store = CertStore::load(&PathBuf::from(bundle), &PathBuf::from(certs))
        .unwrap_or_else(|err| panic!("{err}"));
    let config = store
        .client_config(&source, &expected)
        .unwrap_or_else(|err| panic!("{err}"));
    let pool = Pool::new(Settings::default());
    let request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(target.to_string())
        .body(())
        .expect("a valid request");
    let dial = || async move {
        let tcp = TcpStream::connect(agent).await?;
        let name = tls::server_name(&sni).map_err(std::io::Error::other)?;
        TlsConnector::from(config).connect(name, tcp).await
    };
    match pool.connect(&"test", dial, request).await {
        Ok(mut tunnel) => {
            tunnel
                .write_all(b"GET / HTTP/1.0\r\n\r\n")
                .await
                .expect("write through the tunnel");
            let mut answer = Vec::new();
            let _ = tunnel.read_to_end(&mut answer).await;
            let answer = String::from_utf8_lossy(&answer);
            let body = answer.rsplit("\r\n\r\n").next().unwrap_or_default();
            println!("status 200 {}", body.lines().next().unwrap_or_default());
        }
        Err(HboneError::Refused(status)) => println!("refused {}", status.as_u16()),
        Err(err) => println!("error {err}"),
    }
}
