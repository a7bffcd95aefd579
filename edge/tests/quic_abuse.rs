//! QUIC abuse a client can cause before its address is validated: the edge sends at most three
//! times the bytes it received on an unvalidated path, and a Retry token only validates the
//! address it was issued to.
//!
//! The client is quinn-proto driven by hand over plain UDP sockets, so the test decides which
//! socket sends each datagram and can stop responding to the server at any point.

mod common;

use std::{
    net::UdpSocket,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::BytesMut;
use common::Edge;
use quinn_proto::{
    ClientConfig, ConnectionError, DatagramEvent, Endpoint, EndpointConfig, Event,
    TransportErrorCode,
};

/// The smallest datagram that carries a client's Initial packet (RFC 9000, section 14.1).
const MIN_INITIAL_DATAGRAM: usize = 1200;

/// Starts an edge that serves `a.test` with a self-signed certificate of more than `min_bytes`
/// bytes, and returns it with the certificate's DER encoding.
fn edge_with_large_certificate(name: &str, min_bytes: usize, extra: &[&str]) -> (Edge, Vec<u8>) {
    let dir = common::temp_dir(name);
    // Many long subject alternative names make the server's handshake flight larger than
    // three times one Initial datagram, so the amplification limit must hold it back.
    let mut names = vec!["a.test".to_owned()];
    for index in 0..200 {
        names.push(format!("name-{index:03}-padding-the-certificate.a.test"));
    }
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(names)
        .unwrap()
        .self_signed(&key)
        .unwrap();
    assert!(
        cert.der().len() > min_bytes,
        "certificate of {} bytes is too small for the test",
        cert.der().len()
    );
    std::fs::write(dir.join("a.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("a.key"), key.serialize_pem()).unwrap();
    let routes = r#"
http:
  routers:
    a:
      rule: "Host(`a.test`)"
      service: app
      tls: {}
  services:
    app:
      loadBalancer:
        servers:
          - url: "http://127.0.0.1:9"
tls:
  certificates:
    - certFile: a.pem
      keyFile: a.key
"#;
    let routes_file = dir.join("routes.yaml");
    std::fs::write(&routes_file, routes).unwrap();
    let edge = Edge::start_with_file(dir, &routes_file, extra);
    (edge, cert.der().to_vec())
}

/// Returns a QUIC client configuration for ALPN `h3` that trusts `cert_der`.
fn client_config(cert_der: &[u8]) -> ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from(cert_der.to_vec()))
        .unwrap();
    // The edge uses ring too; the deprecation is about post-quantum key exchange.
    #[allow(deprecated)]
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn_proto::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    ClientConfig::new(Arc::new(crypto))
}

fn udp_socket() -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    socket
}

/// Reads every datagram that arrives on `socket` within `window`.
fn receive_for(socket: &UdpSocket, window: Duration) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + window;
    let mut datagrams = Vec::new();
    let mut buf = [0u8; 65535];
    while Instant::now() < deadline {
        match socket.recv(&mut buf) {
            Ok(len) => datagrams.push(buf[..len].to_vec()),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("receiving from the edge failed: {e}"),
        }
    }
    datagrams
}

/// Reads a QUIC variable-length integer at `*pos` and advances past it.
fn read_varint(data: &[u8], pos: &mut usize) -> Option<u64> {
    let first = *data.get(*pos)?;
    let len = 1usize << (first >> 6);
    let bytes = data.get(*pos..*pos + len)?;
    let mut value = u64::from(first & 0x3f);
    for byte in &bytes[1..] {
        value = (value << 8) | u64::from(*byte);
    }
    *pos += len;
    Some(value)
}

/// Long-header packet types of QUIC version 1 (RFC 9000, section 17.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PacketType {
    Initial,
    ZeroRtt,
    Handshake,
    Retry,
    /// A short-header (1-RTT) packet, which ends the datagram.
    Short,
}

/// Lists the types of the packets coalesced in one datagram, or `None` when a header is
/// truncated.
fn packet_types(datagram: &[u8]) -> Option<Vec<PacketType>> {
    let mut types = Vec::new();
    let mut pos = 0;
    while pos < datagram.len() {
        let first = datagram[pos];
        if first & 0x80 == 0 {
            types.push(PacketType::Short);
            break;
        }
        let kind = match (first >> 4) & 0x03 {
            0 => PacketType::Initial,
            1 => PacketType::ZeroRtt,
            2 => PacketType::Handshake,
            _ => PacketType::Retry,
        };
        types.push(kind);
        if kind == PacketType::Retry {
            break;
        }
        // Flags and version, then the two connection IDs with their lengths.
        pos += 5;
        for _ in 0..2 {
            let len = usize::from(*datagram.get(pos)?);
            pos += 1 + len;
        }
        if kind == PacketType::Initial {
            let token_len = read_varint(datagram, &mut pos)?;
            pos += usize::try_from(token_len).ok()?;
        }
        let payload_len = read_varint(datagram, &mut pos)?;
        pos += usize::try_from(payload_len).ok()?;
    }
    (pos <= datagram.len()).then_some(types)
}

fn total_len(datagrams: &[Vec<u8>]) -> usize {
    datagrams.iter().map(Vec::len).sum()
}

#[test]
fn amplification_limited_before_validation() {
    let limit = 3 * MIN_INITIAL_DATAGRAM;
    // No Retry: the edge responds to the first Initial with its handshake flight.
    let (edge, cert_der) =
        edge_with_large_certificate("quic-amplification", limit, &["--http3-retry-after", "100"]);

    let mut client = Endpoint::new(Arc::new(EndpointConfig::default()), None, false, None);
    let (_, mut connection) = client
        .connect(
            Instant::now(),
            client_config(&cert_der),
            edge.https,
            "a.test",
        )
        .unwrap();
    let mut buf = Vec::new();
    let transmit = connection
        .poll_transmit(Instant::now(), 1, &mut buf)
        .expect("the client has an Initial to send");
    let socket = udp_socket();
    socket.send_to(&buf[..transmit.size], edge.https).unwrap();
    let sent = transmit.size;
    assert!(
        sent >= MIN_INITIAL_DATAGRAM,
        "Initial datagram of {sent} bytes"
    );

    // The client never responds, so the path stays unvalidated while the server's probe timers
    // fire; a few seconds cover several probe timeouts.
    let received = receive_for(&socket, Duration::from_secs(3));
    let received_bytes = total_len(&received);
    assert!(
        received_bytes <= 3 * sent,
        "the edge sent {received_bytes} bytes in {} datagrams after receiving {sent}",
        received.len()
    );
    // The limit, not a small flight, bounded the response because the edge used most of its budget.
    assert!(
        received_bytes > 2 * sent,
        "the edge sent only {received_bytes} bytes after receiving {sent}"
    );
}

#[test]
fn retry_token_bound_to_address() {
    // Every connection attempt must pass a Retry round trip. One worker: each worker's endpoint
    // has its own token key, and a replay that the kernel hands to another worker's socket
    // would get a fresh Retry there instead of the rejection checked here.
    let (edge, cert_der) = edge_with_large_certificate(
        "quic-retry-token",
        0,
        &["--http3-retry-after", "0", "--workers", "1"],
    );
    let server = edge.https;

    let mut client = Endpoint::new(Arc::new(EndpointConfig::default()), None, false, None);
    let (_, mut connection) = client
        .connect(Instant::now(), client_config(&cert_der), server, "a.test")
        .unwrap();
    let mut buf = Vec::new();
    let first = connection
        .poll_transmit(Instant::now(), 1, &mut buf)
        .expect("the client has an Initial to send");
    let owner = udp_socket();
    owner.send_to(&buf[..first.size], server).unwrap();

    let retry = receive_for(&owner, Duration::from_secs(1));
    assert_eq!(retry.len(), 1, "expected one Retry datagram, got {retry:?}");
    assert_eq!(packet_types(&retry[0]), Some(vec![PacketType::Retry]));
    let mut response = Vec::new();
    match client.handle(
        Instant::now(),
        server,
        None,
        None,
        BytesMut::from(&retry[0][..]),
        &mut response,
    ) {
        Some(DatagramEvent::ConnectionEvent(_, event)) => connection.handle_event(event),
        _ => panic!("the client did not take the Retry"),
    }
    buf.clear();
    let with_token = connection
        .poll_transmit(Instant::now(), 1, &mut buf)
        .expect("the client resends its Initial with the token");
    let with_token = buf[..with_token.size].to_vec();

    // The same Initial, token included, from another address is rejected.
    let other = udp_socket();
    other.send_to(&with_token, server).unwrap();
    let rejected = receive_for(&other, Duration::from_secs(1));
    for datagram in &rejected {
        let types = packet_types(datagram).expect("well-formed packets");
        assert!(
            !types.contains(&PacketType::Handshake),
            "handshake continued for a replayed token: {types:?}"
        );
    }
    assert!(
        total_len(&rejected) <= 3 * with_token.len(),
        "the edge sent {} bytes to the replaying address",
        total_len(&rejected)
    );
    let close = rejected
        .first()
        .expect("the edge responds to a replayed token");
    if let Some(DatagramEvent::ConnectionEvent(_, event)) = client.handle(
        Instant::now(),
        server,
        None,
        None,
        BytesMut::from(&close[..]),
        &mut response,
    ) {
        connection.handle_event(event);
    }
    let mut lost = None;
    while let Some(event) = connection.poll() {
        if let Event::ConnectionLost { reason } = event {
            lost = Some(reason);
        }
    }
    match lost {
        Some(ConnectionError::ConnectionClosed(close)) => {
            assert_eq!(close.error_code, TransportErrorCode::INVALID_TOKEN)
        }
        other => panic!("expected a close with INVALID_TOKEN, got {other:?}"),
    }

    // From the address it was issued to, the token is accepted and the handshake goes on.
    owner.send_to(&with_token, server).unwrap();
    let accepted = receive_for(&owner, Duration::from_secs(1));
    let types: Vec<PacketType> = accepted
        .iter()
        .flat_map(|datagram| packet_types(datagram).expect("well-formed packets"))
        .collect();
    assert!(
        types.contains(&PacketType::Handshake),
        "no Handshake packet for the owner's token: {types:?}"
    );
    edge.expect_metric("edge_quic_retries_total 1\n");
}

#[test]
fn packet_types_of_coalesced_datagram() {
    // An Initial with a 2-byte token and 3 bytes of payload, then a Handshake packet with
    // 2 bytes of payload, then a short-header packet.
    let mut datagram = vec![0xc0, 0, 0, 0, 1, 1, 0xaa, 0];
    datagram.extend_from_slice(&[2, 0x01, 0x02, 3, 0, 0, 0]);
    datagram.extend_from_slice(&[0xe0, 0, 0, 0, 1, 0, 0, 2, 0, 0]);
    datagram.extend_from_slice(&[0x40, 1, 2, 3]);
    assert_eq!(
        packet_types(&datagram),
        Some(vec![
            PacketType::Initial,
            PacketType::Handshake,
            PacketType::Short
        ])
    );
    assert_eq!(packet_types(&datagram[..9]), None);
    assert_eq!(
        packet_types(&[0xf0, 0, 0, 0, 1]),
        Some(vec![PacketType::Retry])
    );
}
