//! gRPC through the edge: a tonic client over TLS (HTTP/2) and a tonic server reached over
//! h2c, with unary and server-streaming calls, a trailers-only error and a deadline. Messages
//! are raw bytes with a hand-written codec, so no protobuf compiler is needed.

mod common;

use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use common::{routes_yaml, Edge};
use tonic::{
    body::Body,
    client::Grpc as GrpcClient,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::{http, BoxFuture, Service},
    server::{
        Grpc as GrpcServer, NamedService, ServerStreamingService, StreamingService, UnaryService,
    },
    transport::{Certificate, Channel, ClientTlsConfig, Server},
    Code, Request, Response, Status, Streaming,
};

/// Encodes and decodes messages as their raw bytes.
#[derive(Default, Clone, Copy)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        use bytes::Buf;
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

/// `test.Echo`: `Unary` echoes its message with a prefix, `Count` streams N messages, `Chat`
/// echoes a stream, `Fail` returns NOT_FOUND without a message, and `Stall` stops after its
/// first message.
#[derive(Clone)]
struct Echo;

impl NamedService for Echo {
    const NAME: &'static str = "test.Echo";
}

struct UnaryEcho;

impl UnaryService<Vec<u8>> for UnaryEcho {
    type Response = Vec<u8>;
    type Future = BoxFuture<Response<Vec<u8>>, Status>;

    fn call(&mut self, request: Request<Vec<u8>>) -> Self::Future {
        Box::pin(async move {
            let mut reply = b"echo: ".to_vec();
            reply.extend_from_slice(request.get_ref());
            Ok(Response::new(reply))
        })
    }
}

struct Failing;

impl UnaryService<Vec<u8>> for Failing {
    type Response = Vec<u8>;
    type Future = BoxFuture<Response<Vec<u8>>, Status>;

    fn call(&mut self, _: Request<Vec<u8>>) -> Self::Future {
        Box::pin(async { Err(Status::not_found("no such record")) })
    }
}

/// Streams one message at once and the next after 5 seconds. tonic's server enforces
/// `grpc-timeout` only until the response head, so only the edge can end this call early.
struct Stall;

type BoxStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Vec<u8>, Status>> + Send + 'static>>;

impl ServerStreamingService<Vec<u8>> for Stall {
    type Response = Vec<u8>;
    type ResponseStream = BoxStream;
    type Future = BoxFuture<Response<BoxStream>, Status>;

    fn call(&mut self, _: Request<Vec<u8>>) -> Self::Future {
        use futures_util::StreamExt;
        let first = futures_util::stream::iter([Ok(b"first".to_vec())]);
        let late = futures_util::stream::once(async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok(b"late".to_vec())
        });
        let stream: BoxStream = Box::pin(first.chain(late));
        Box::pin(async move { Ok(Response::new(stream)) })
    }
}

struct Count;

impl ServerStreamingService<Vec<u8>> for Count {
    type Response = Vec<u8>;
    type ResponseStream = futures_util::stream::Iter<std::vec::IntoIter<Result<Vec<u8>, Status>>>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<Vec<u8>>) -> Self::Future {
        Box::pin(async move {
            let count: usize = String::from_utf8_lossy(request.get_ref())
                .parse()
                .map_err(|_| Status::invalid_argument("count is not a number"))?;
            let items: Vec<Result<Vec<u8>, Status>> = (0..count)
                .map(|i| Ok(format!("item {i}").into_bytes()))
                .collect();
            Ok(Response::new(futures_util::stream::iter(items)))
        })
    }
}

/// Echoes each message of a bidirectional stream as it arrives.
struct Chat;

impl StreamingService<Vec<u8>> for Chat {
    type Response = Vec<u8>;
    type ResponseStream = BoxStream;
    type Future = BoxFuture<Response<BoxStream>, Status>;

    fn call(&mut self, request: Request<Streaming<Vec<u8>>>) -> Self::Future {
        use futures_util::StreamExt;
        let replies = request.into_inner().map(|message| {
            message.map(|m| {
                let mut reply = b"re: ".to_vec();
                reply.extend_from_slice(&m);
                reply
            })
        });
        let stream: BoxStream = Box::pin(replies);
        Box::pin(async move { Ok(Response::new(stream)) })
    }
}

impl Service<http::Request<Body>> for Echo {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let te = request
            .headers()
            .get("te")
            .map(|v| v.to_str().unwrap_or_default().to_owned());
        Box::pin(async move {
            let mut grpc = GrpcServer::new(RawCodec);
            let mut response = match request.uri().path() {
                "/test.Echo/Unary" => grpc.unary(UnaryEcho, request).await,
                "/test.Echo/Fail" => grpc.unary(Failing, request).await,
                "/test.Echo/Stall" => grpc.server_streaming(Stall, request).await,
                "/test.Echo/Chat" => grpc.streaming(Chat, request).await,
                "/test.Echo/Count" => grpc.server_streaming(Count, request).await,
                _ => Status::unimplemented("no such method").into_http(),
            };
            // Report the TE header the server received, so the test can check it.
            if let Some(te) = te.and_then(|v| http::HeaderValue::from_str(&v).ok()) {
                response.headers_mut().insert("x-seen-te", te);
            }
            Ok(response)
        })
    }
}

/// Starts the tonic server on an ephemeral port. Returns its address and a count of the TCP
/// connections it accepted.
async fn start_server() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    use futures_util::StreamExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let incoming = tonic::codegen::tokio_stream::wrappers::TcpListenerStream::new(listener)
        .inspect(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
        });
    tokio::spawn(async move {
        Server::builder()
            .add_service(Echo)
            .serve_with_incoming(incoming)
            .await
            .unwrap();
    });
    (addr, accepted)
}

/// Starts the edge with a certificate for `grpc.test` signed by a test CA, routing to the
/// tonic server over h2c. Returns the edge and the CA certificate in PEM.
fn start_edge(server: std::net::SocketAddr) -> (Edge, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    // curl (OpenSSL) rejects a CA with an empty subject.
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "edge gRPC test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["grpc.test".to_owned()]).unwrap();
    let cert = params.signed_by(&key, &ca_cert, &ca_key).unwrap();

    let dir = common::temp_dir("grpc");
    std::fs::write(dir.join("grpc.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("grpc.key"), key.serialize_pem()).unwrap();
    let mut routes = routes_yaml(&[("grpc", "Host(`grpc.test`)", &format!("h2c://{server}"))]);
    routes.push_str("tls:\n  certificates:\n    - certFile: grpc.pem\n      keyFile: grpc.key\n");
    let routes_file = dir.join("routes.yaml");
    std::fs::write(&routes_file, routes).unwrap();
    let edge = Edge::start_with_file(dir, &routes_file, &[]);
    (edge, ca_cert.pem())
}

async fn client(edge: &Edge, ca_pem: &str) -> GrpcClient<Channel> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("grpc.test");
    let channel = Channel::from_shared(format!("https://grpc.test:{}", edge.https.port()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .origin(
            format!("https://grpc.test:{}", edge.https.port())
                .parse()
                .unwrap(),
        )
        .connect_with_connector(tower_connector(edge.https))
        .await
        .unwrap();
    GrpcClient::new(channel)
}

/// Connects every channel to the edge's loopback address, whatever host the URI names.
fn tower_connector(
    addr: std::net::SocketAddr,
) -> impl tonic::codegen::Service<
    http::Uri,
    Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>,
    Error = std::io::Error,
    Future = BoxFuture<hyper_util::rt::TokioIo<tokio::net::TcpStream>, std::io::Error>,
> + Clone {
    #[derive(Clone)]
    struct Loopback(std::net::SocketAddr);
    impl Service<http::Uri> for Loopback {
        type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
        type Error = std::io::Error;
        type Future = BoxFuture<Self::Response, Self::Error>;
        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: http::Uri) -> Self::Future {
            let addr = self.0;
            Box::pin(async move {
                let stream = tokio::net::TcpStream::connect(addr).await?;
                Ok(hyper_util::rt::TokioIo::new(stream))
            })
        }
    }
    Loopback(addr)
}

fn path(method: &str) -> http::uri::PathAndQuery {
    format!("/test.Echo/{method}").parse().unwrap()
}

#[tokio::test]
async fn grpc_calls_through_edge() {
    let (server, accepted) = start_server().await;
    let (edge, ca_pem) = start_edge(server);
    let mut grpc = client(&edge, &ca_pem).await;

    // Unary, on a connection the edge reuses for every call below.
    grpc.ready().await.unwrap();
    let reply = grpc
        .unary(Request::new(b"hi".to_vec()), path("Unary"), RawCodec)
        .await
        .unwrap();
    assert_eq!(reply.get_ref(), b"echo: hi");
    assert_eq!(
        reply
            .metadata()
            .get("x-seen-te")
            .map(|v| v.to_str().unwrap()),
        Some("trailers")
    );

    // Server streaming.
    grpc.ready().await.unwrap();
    let mut stream = grpc
        .server_streaming(Request::new(b"5".to_vec()), path("Count"), RawCodec)
        .await
        .unwrap()
        .into_inner();
    let mut items = Vec::new();
    while let Some(item) = stream.message().await.unwrap() {
        items.push(String::from_utf8(item).unwrap());
    }
    assert_eq!(items, ["item 0", "item 1", "item 2", "item 3", "item 4"]);

    // Bidirectional streaming: each reply arrives before the next message is sent, so the
    // edge must relay both directions at once.
    grpc.ready().await.unwrap();
    let (outgoing, receiver) = tokio::sync::mpsc::channel::<Vec<u8>>(1);
    let requests = tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(receiver);
    outgoing.send(b"one".to_vec()).await.unwrap();
    let mut replies = grpc
        .streaming(Request::new(requests), path("Chat"), RawCodec)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replies.message().await.unwrap(), Some(b"re: one".to_vec()));
    outgoing.send(b"two".to_vec()).await.unwrap();
    assert_eq!(replies.message().await.unwrap(), Some(b"re: two".to_vec()));
    drop(outgoing);
    assert_eq!(replies.message().await.unwrap(), None);

    // A trailers-only error keeps its code and message.
    grpc.ready().await.unwrap();
    let status = grpc
        .unary(Request::new(Vec::new()), path("Fail"), RawCodec)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(status.message(), "no such record");

    // The deadline in grpc-timeout ends a stalled call at the edge.
    grpc.ready().await.unwrap();
    let mut request = Request::new(Vec::new());
    request.set_timeout(Duration::from_millis(500));
    let mut stream = grpc
        .server_streaming(request, path("Stall"), RawCodec)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stream.message().await.unwrap(), Some(b"first".to_vec()));
    let status = stream.message().await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert_eq!(status.message(), "deadline exceeded");

    // One client connection reaches one worker, which reused one backend connection.
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    edge.expect_metric("edge_requests_total{route=\"grpc\",code=\"2xx\",protocol=\"h2\"} 5\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_request_reaches_h2c_backend() {
    let (server, _) = start_server().await;
    let (edge, _) = start_edge(server);
    let http = edge.http;
    let raw = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(http).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        // One gRPC message: not compressed, 2 bytes long, "hi".
        let message = [0u8, 0, 0, 0, 2, b'h', b'i'];
        let head = "POST /test.Echo/Unary HTTP/1.1\r\nHost: grpc.test\r\n\
                    Content-Type: application/grpc\r\nTE: trailers\r\n\
                    Content-Length: 7\r\nConnection: close\r\n\r\n";
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(&message).unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).unwrap();
        response
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    assert!(
        text.starts_with("HTTP/1.1 200 OK\r\n"),
        "response: {text:?}"
    );
    assert!(
        text.contains("transfer-encoding: chunked") || text.contains("Transfer-Encoding: chunked"),
        "response: {text:?}"
    );
    // The client's `TE: trailers` reached the backend, which grpc-core servers require.
    assert!(
        text.to_ascii_lowercase()
            .contains("x-seen-te: trailers\r\n"),
        "response: {text:?}"
    );
    // The reply message, then the gRPC status in the trailer section of the last chunk.
    assert!(text.contains("echo: hi"), "response: {text:?}");
    assert!(
        text.contains("\r\n0\r\ngrpc-status: 0\r\n"),
        "response: {text:?}"
    );
}

/// Frames one gRPC message: not compressed, then the length and the bytes.
fn grpc_frame(message: &[u8]) -> bytes::Bytes {
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(message);
    frame.into()
}

/// Builds a gRPC request over HTTP/3 for `method`, with `extra` header fields.
fn h3_grpc_request(method: &str, extra: &[(&str, &str)]) -> http::Request<()> {
    let mut request = http::Request::post(format!("https://grpc.test/test.Echo/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in extra {
        request = request.header(*name, *value);
    }
    request.body(()).unwrap()
}

#[tokio::test]
async fn grpc_calls_over_http3() {
    use bytes::Buf;
    use common::h3client::{self, Client, STEP_LIMIT};
    use rustls_pki_types::{pem::PemObject, CertificateDer};

    let (server, accepted) = start_server().await;
    let (edge, ca_pem) = start_edge(server);
    let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap();
    let endpoint = h3client::endpoint("127.0.0.1:0".parse().unwrap(), ca);
    let mut client = Client::connect(&endpoint, edge.https, "grpc.test")
        .await
        .unwrap();

    // Unary: the reply message, then the status in HTTP/3 trailers.
    let reply = client
        .request(h3_grpc_request("Unary", &[]), Some(grpc_frame(b"hi")), None)
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, grpc_frame(b"echo: hi"));
    assert_eq!(reply.headers["x-seen-te"], "trailers");
    let trailers = reply.trailers.expect("no trailers after the reply");
    assert_eq!(trailers["grpc-status"], "0");

    // A trailers-only error: the status is in the response head, with no body or trailers.
    let reply = client
        .request(h3_grpc_request("Fail", &[]), Some(grpc_frame(b"")), None)
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.headers["grpc-status"], "5");
    // gRPC percent-encodes the message on the wire.
    assert_eq!(reply.headers["grpc-message"], "no%20such%20record");
    assert!(reply.body.is_empty());
    assert!(reply.trailers.is_none());

    // Bidirectional streaming: each reply arrives before the next message is sent.
    let mut stream = client.open(h3_grpc_request("Chat", &[])).await.unwrap();
    let mut replies = Vec::new();
    for word in ["one", "two"] {
        stream.send_data(grpc_frame(word.as_bytes())).await.unwrap();
        if word == "one" {
            let head = tokio::time::timeout(STEP_LIMIT, stream.recv_response())
                .await
                .expect("no response head while the request streams")
                .unwrap();
            assert_eq!(head.status(), 200);
        }
        let mut piece = tokio::time::timeout(STEP_LIMIT, stream.recv_data())
            .await
            .expect("no reply while the request streams")
            .unwrap()
            .expect("the response ended early");
        replies.push(piece.copy_to_bytes(piece.remaining()));
    }
    assert_eq!(
        replies,
        vec![grpc_frame(b"re: one"), grpc_frame(b"re: two")]
    );
    stream.finish().await.unwrap();
    let rest = h3client::read_reply_rest(&mut stream).await.unwrap();
    assert!(rest.0.is_empty(), "data after the last reply");
    assert_eq!(rest.1.expect("no trailers")["grpc-status"], "0");

    // The deadline in grpc-timeout ends a stalled call at the edge, in the trailers.
    let reply = client
        .request(
            h3_grpc_request("Stall", &[("grpc-timeout", "500m")]),
            Some(grpc_frame(b"")),
            None,
        )
        .await
        .unwrap();
    assert_eq!(reply.body, grpc_frame(b"first"));
    let trailers = reply.trailers.expect("no trailers after the deadline");
    assert_eq!(trailers["grpc-status"], "4");
    assert_eq!(trailers["grpc-message"], "deadline exceeded");

    // One client connection reaches one QUIC thread, which reused one backend connection.
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    edge.expect_metric("edge_requests_total{route=\"grpc\",code=\"2xx\",protocol=\"h3\"} 4\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_http1_h2c_response_has_alt_svc() {
    let (server, _) = start_server().await;
    let (edge, ca_pem) = start_edge(server);
    let ca = edge.dir.join("ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    let message = edge.dir.join("message.bin");
    // One gRPC message: not compressed, 2 bytes long, "hi".
    std::fs::write(&message, [0u8, 0, 0, 0, 2, b'h', b'i']).unwrap();

    let port = edge.https.port();
    let resolve = format!("grpc.test:{port}:127.0.0.1");
    let url = format!("https://grpc.test:{port}/test.Echo/Unary");
    let data = format!("@{}", message.display());
    let args = [
        "--http1.1",
        "-D",
        "-",
        "-o",
        "/dev/null",
        "--cacert",
        ca.to_str().unwrap(),
        "--resolve",
        &resolve,
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "--data-binary",
        &data,
        &url,
    ]
    .map(str::to_owned);
    let (code, out) = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        common::curl(&args)
    })
    .await
    .unwrap();

    assert_eq!(code, 0, "curl failed: {out}");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let expected = format!("alt-svc: h3=\":{port}\"; ma=86400");
    assert!(
        out.to_ascii_lowercase().contains(&expected),
        "no Alt-Svc in:\n{out}"
    );
}
