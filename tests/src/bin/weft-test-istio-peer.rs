//! An HBONE peer that behaves like Istio's ztunnel, written without weft's own code, to
//! test weft against a peer that is not weft. HBONE is HTTP/2 CONNECT over mutual TLS
//! 1.3 (ALPN `h2`, port 15008); identities are the URI SANs of SPIFFE X.509 certificates
//! (`spiffe://<trust domain>/ns/<ns>/sa/<sa>`).
//!
//! Usage:
//!
//! ```text
//! weft-test-istio-peer client --roots CA.pem --cert CERT.pem --key KEY.pem --expect SPIFFE_ID
//!     --dial IP:15008 --authority IP:PORT [--forwarded-for IP:PORT] [--baggage STR]
//!     [--path /some/path] [--tcp-echo TEXT]
//! weft-test-istio-peer server --roots CA.pem --cert CERT.pem --key KEY.pem
//!     --listen IP:15008 --log FILE
//! ```
//!
//! The client dials without SNI, checks that the server's identity is `--expect`, sends one
//! CONNECT and prints `status <code>`; on 200 it then prints either `echo <answer>` (with
//! `--tcp-echo`: TEXT is written through the tunnel, which is then half-closed) or `---`
//! followed by the answer to an HTTP/1.1 GET of `--path`. Any failure prints
//! `error <message>` and exits 1 (10 s overall timeout).
//!
//! The server, run in a pod's network namespace as ztunnel is, requires a client
//! certificate chained to `--roots`, answers each CONNECT whose target IP is the address
//! it was dialed on by relaying to that target (400 otherwise, 405 for other methods, 503
//! when the target refuses), and appends one JSON line per CONNECT to `--log`.

use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    future::poll_fn,
    io::Write,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http::{Method, Request, Response, StatusCode};
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, aws_lc_rs},
    server::{ParsedCertificate, WebPkiClientVerifier},
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject};
use serde::Serialize;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

type Error = Box<dyn std::error::Error + Send + Sync>;

const USAGE: &str = "usage:
  weft-test-istio-peer client --roots CA.pem --cert CERT.pem --key KEY.pem --expect SPIFFE_ID
      --dial IP:15008 --authority IP:PORT [--forwarded-for IP:PORT] [--baggage STR]
      [--path /some/path] [--tcp-echo TEXT]
  weft-test-istio-peer server --roots CA.pem --cert CERT.pem --key KEY.pem
      --listen IP:15008 --log FILE";

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((mode, flags)) = args.split_first() else {
        usage();
    };
    let flags = parse_flags(flags);
    let result = match mode.as_str() {
        "client" => match tokio::time::timeout(Duration::from_secs(10), client(&flags)).await {
            Ok(result) => result,
            Err(_) => Err("timeout".into()),
        },
        "server" => server(&flags).await,
        _ => usage(),
    };
    if let Err(err) = result {
        println!("error {err}");
        std::process::exit(1);
    }
}

fn usage() -> ! {
    eprintln!("{USAGE}");
    std::process::exit(2);
}

/// `--name value` pairs; anything else is a usage error.
fn parse_flags(args: &[String]) -> HashMap<String, String> {
    let mut flags = HashMap::new();
    for pair in args.chunks(2) {
        let [name, value] = pair else { usage() };
        let Some(name) = name.strip_prefix("--") else {
            usage()
        };
        flags.insert(name.to_string(), value.clone());
    }
    flags
}

fn required<'a>(flags: &'a HashMap<String, String>, name: &str) -> Result<&'a str, Error> {
    flags
        .get(name)
        .map(String::as_str)
        .ok_or_else(|| format!("missing --{name}").into())
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(aws_lc_rs::default_provider())
}

/// The certificate chain (leaf first) and key a peer presents.
fn load_identity(
    flags: &HashMap<String, String>,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), Error> {
    let cert = required(flags, "cert")?;
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(Iterator::collect)
        .map_err(|err| format!("{cert}: {err}"))?;
    let key = required(flags, "key")?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|err| format!("{key}: {err}"))?;
    Ok((chain, key))
}

fn load_roots(flags: &HashMap<String, String>) -> Result<Arc<RootCertStore>, Error> {
    let path = required(flags, "roots")?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|err| format!("{path}: {err}"))? {
        roots.add(cert.map_err(|err| format!("{path}: {err}"))?)?;
    }
    Ok(Arc::new(roots))
}

/// The (first) URI SAN of a certificate: its SPIFFE identity.
fn uri_san(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::URI(uri) => Some(uri.to_string()),
        _ => None,
    })
}

/// Checks the server's chain against the roots as WebPKI does, but the server's identity
/// against a SPIFFE ID instead of a DNS name or IP address.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    expected: String,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let algorithms = self.provider.signature_verification_algorithms;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &ParsedCertificate::try_from(end_entity)?,
            &self.roots,
            intermediates,
            now,
            algorithms.all,
        )?;
        match uri_san(end_entity) {
            Some(identity) if identity == self.expected => Ok(ServerCertVerified::assertion()),
            // Not a `CertificateError`: its `Display` would hide the message.
            identity => Err(rustls::Error::General(format!(
                "server identity {:?} is not {:?}",
                identity.unwrap_or_default(),
                self.expected
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Sends `data` on an h2 stream as the peer's flow-control window allows.
async fn send_all(stream: &mut SendStream<Bytes>, mut data: Bytes) -> Result<(), Error> {
    while !data.is_empty() {
        stream.reserve_capacity(data.len());
        match poll_fn(|cx| stream.poll_capacity(cx)).await {
            Some(Ok(0)) => {}
            Some(Ok(n)) => stream.send_data(data.split_to(n.min(data.len())), false)?,
            Some(Err(err)) => return Err(err.into()),
            None => return Err("stream closed while sending".into()),
        }
    }
    Ok(())
}

/// Copies an h2 stream's data to `out` until its end, releasing the window as it goes.
async fn recv_all(body: &mut RecvStream, out: &mut (impl AsyncWrite + Unpin)) -> Result<(), Error> {
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        out.write_all(&chunk).await?;
        body.flow_control().release_capacity(chunk.len())?;
    }
    Ok(())
}

/// Copies `input` to an h2 stream until EOF, then ends the stream.
async fn send_from(
    input: &mut (impl AsyncRead + Unpin),
    stream: &mut SendStream<Bytes>,
) -> Result<(), Error> {
    let mut buf = vec![0; 16 * 1024];
    loop {
        let n = input.read(&mut buf).await?;
        if n == 0 {
            stream.send_data(Bytes::new(), true)?;
            return Ok(());
        }
        send_all(stream, Bytes::copy_from_slice(&buf[..n])).await?;
    }
}

async fn client(flags: &HashMap<String, String>) -> Result<(), Error> {
    let provider = provider();
    let verifier = SpiffeServerVerifier {
        roots: load_roots(flags)?,
        provider: provider.clone(),
        expected: required(flags, "expect")?.to_string(),
    };
    let (chain, key) = load_identity(flags)?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    // An IP address server name already sends no SNI; say it anyway.
    config.enable_sni = false;

    let dial: SocketAddr = required(flags, "dial")?.parse()?;
    let authority = required(flags, "authority")?;
    let tcp = TcpStream::connect(dial).await?;
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(dial.ip().into()), tcp)
        .await?;
    let (h2, connection) = h2::client::handshake(tls).await?;
    // Its errors also fail the request below, which reports them.
    tokio::spawn(connection);

    let mut request = Request::builder().method(Method::CONNECT).uri(authority);
    if let Some(forwarded_for) = flags.get("forwarded-for") {
        request = request.header("forwarded", format!("for=\"{forwarded_for}\""));
    }
    if let Some(baggage) = flags.get("baggage") {
        request = request.header("baggage", baggage);
    }
    let mut h2 = h2.ready().await?;
    let (response, mut send) = h2.send_request(request.body(())?, false)?;
    let response = response.await?;
    println!("status {}", response.status().as_u16());
    if response.status() != StatusCode::OK {
        return Ok(());
    }

    let payload = match flags.get("tcp-echo") {
        Some(text) => text.clone(),
        None => {
            let path = flags.get("path").map_or("/", String::as_str);
            format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n")
        }
    };
    send_all(&mut send, Bytes::from(payload)).await?;
    send.send_data(Bytes::new(), true)?;
    let mut answer = Vec::new();
    recv_all(&mut response.into_body(), &mut answer).await?;
    let answer = String::from_utf8_lossy(&answer);
    if flags.contains_key("tcp-echo") {
        println!("echo {answer}");
    } else {
        println!("---");
        print!("{answer}");
    }
    Ok(())
}

async fn server(flags: &HashMap<String, String>) -> Result<(), Error> {
    let provider = provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(load_roots(flags)?, provider.clone())
            .build()?;
    let (chain, key) = load_identity(flags)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));

    let log_path = required(flags, "log")?;
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .map_err(|err| format!("{log_path}: {err}"))?;
    let log = Arc::new(Mutex::new(log));

    let listener = TcpListener::bind(required(flags, "listen")?).await?;
    println!("listening {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                eprintln!("accept: {err}");
                continue;
            }
        };
        let (acceptor, log) = (acceptor.clone(), log.clone());
        tokio::spawn(async move {
            if let Err(err) = serve_connection(acceptor, tcp, log).await {
                eprintln!("connection from {peer}: {err}");
            }
        });
    }
}

/// What the log records of a TLS connection.
#[derive(Debug, Clone)]
struct Session {
    client_identity: String,
    local: SocketAddr,
    sni: String,
}

async fn serve_connection(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    log: Arc<Mutex<File>>,
) -> Result<(), Error> {
    let local = tcp.local_addr()?;
    let tls = acceptor.accept(tcp).await?;
    let (_, session) = tls.get_ref();
    let session = Session {
        client_identity: session
            .peer_certificates()
            .and_then(|chain| uri_san(chain.first()?))
            .unwrap_or_default(),
        local,
        sni: session.server_name().unwrap_or_default().to_string(),
    };
    let mut connection = h2::server::handshake(tls).await?;
    while let Some(request) = connection.accept().await {
        let (request, respond) = request?;
        let (session, log) = (session.clone(), log.clone());
        tokio::spawn(async move {
            if let Err(err) = serve_request(request, respond, &session, &log).await {
                eprintln!("request on {}: {err}", session.local);
            }
        });
    }
    Ok(())
}

/// One line of `--log`, one per CONNECT.
#[derive(Debug, Serialize)]
struct LogLine<'a> {
    client_identity: &'a str,
    local: String,
    authority: &'a str,
    forwarded: String,
    baggage: String,
    traceparent: String,
    sni: &'a str,
    status: u16,
}

async fn serve_request(
    request: Request<RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    session: &Session,
    log: &Mutex<File>,
) -> Result<(), Error> {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
            .unwrap_or_default()
    };
    let authority = request
        .uri()
        .authority()
        .map(|authority| authority.to_string())
        .unwrap_or_default();

    // ztunnel only tunnels to the address it was dialed on.
    let mut target = None;
    let status = if request.method() != Method::CONNECT {
        StatusCode::METHOD_NOT_ALLOWED
    } else {
        match authority.parse::<SocketAddr>() {
            Ok(addr) if addr.ip().to_canonical() == session.local.ip().to_canonical() => {
                match TcpStream::connect(addr).await {
                    Ok(tcp) => {
                        target = Some(tcp);
                        StatusCode::OK
                    }
                    Err(_) => StatusCode::SERVICE_UNAVAILABLE,
                }
            }
            _ => StatusCode::BAD_REQUEST,
        }
    };

    let line = LogLine {
        client_identity: &session.client_identity,
        local: session.local.to_string(),
        authority: &authority,
        forwarded: header("forwarded"),
        baggage: header("baggage"),
        traceparent: header("traceparent"),
        sni: &session.sni,
        status: status.as_u16(),
    };
    let line = serde_json::to_string(&line)? + "\n";
    {
        let mut log = log.lock().map_err(|_| "log lock poisoned")?;
        log.write_all(line.as_bytes())?;
        log.flush()?;
    }

    let response = Response::builder().status(status).body(())?;
    let Some(tcp) = target else {
        respond.send_response(response, true)?;
        return Ok(());
    };
    let mut send = respond.send_response(response, false)?;
    let mut body = request.into_body();
    let (mut tcp_read, mut tcp_write) = tcp.into_split();
    // Each direction ends on its own: h2 end of stream shuts the TCP write side down,
    // TCP EOF ends the h2 response.
    let upstream = async {
        recv_all(&mut body, &mut tcp_write).await?;
        tcp_write.shutdown().await?;
        Ok::<_, Error>(())
    };
    tokio::try_join!(upstream, send_from(&mut tcp_read, &mut send))?;
    Ok(())
}
