//! HTTP/3 in the load generator: QUIC connections from one quinn endpoint per thread, each
//! carrying several request streams in a closed loop, as the HTTP/2 client does over TCP.

use std::{cell::RefCell, net::SocketAddr, rc::Rc, sync::Arc, time::Instant};

use anyhow::Context as _;
use bytes::{Buf as _, Bytes};

use super::{
    record, status_result, stream_error_ends_connection, Shared, CONNECT_RETRY_PAUSE,
    MAX_RESPONSE_BYTES,
};
use crate::stats::{ErrorKind, Recorder};

/// The side of an HTTP/3 connection that starts requests.
type H3Client = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;

/// Creates the client endpoint of one thread, on an ephemeral UDP port of the loopback
/// address of `target`'s family. Must be called inside a tokio runtime.
///
/// # Errors
/// Fails when the UDP socket cannot be bound.
pub(super) fn client_endpoint(target: SocketAddr) -> anyhow::Result<quinn::Endpoint> {
    let bind: SocketAddr = if target.is_ipv4() {
        SocketAddr::from(([127, 0, 0, 1], 0))
    } else {
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0))
    };
    quinn::Endpoint::client(bind).with_context(|| format!("binding a QUIC client socket on {bind}"))
}

/// Runs one closed-loop HTTP/3 connection: opens it, runs `streams` request loops on it, and
/// opens a new one when it fails, until the window ends.
pub(super) async fn closed_loop(
    shared: &Arc<Shared>,
    endpoint: &quinn::Endpoint,
    recorder: &Rc<RefCell<Recorder>>,
) {
    loop {
        let started = Instant::now();
        if started >= shared.window.end || shared.stopped() {
            break;
        }
        let opened = tokio::time::timeout(
            shared.config.request_timeout,
            open(shared, endpoint, recorder),
        )
        .await
        .unwrap_or(Err(ErrorKind::Timeout));
        let (client, driver) = match opened {
            Ok(opened) => opened,
            Err(kind) => {
                // The first request of every stream fails with the connection.
                if started >= shared.window.measure_from {
                    recorder
                        .borrow_mut()
                        .add_errors(kind, shared.config.streams as u64);
                }
                tokio::time::sleep(CONNECT_RETRY_PAUSE).await;
                continue;
            }
        };
        let mut streams = tokio::task::JoinSet::new();
        for _ in 0..shared.config.streams {
            let shared = shared.clone();
            let recorder = recorder.clone();
            let client = client.clone();
            streams.spawn_local(async move { stream_loop(&shared, &recorder, client).await });
        }
        // The connection closes with H3_NO_ERROR when the last client handle is dropped.
        drop(client);
        while streams.join_next().await.is_some() {}
        driver.abort();
    }
}

/// Sends requests one after another on new streams of `client` until the window ends or the
/// connection fails.
async fn stream_loop(shared: &Shared, recorder: &RefCell<Recorder>, mut client: H3Client) {
    loop {
        let started = Instant::now();
        if started >= shared.window.end || shared.stopped() {
            break;
        }
        let result = tokio::time::timeout(
            shared.config.request_timeout,
            exchange(&mut client, &shared.h2_uri),
        )
        .await
        .unwrap_or(Err(ErrorKind::Timeout))
        .and_then(status_result);
        let done = Instant::now();
        if started >= shared.window.measure_from {
            record(recorder, result, done - started);
        }
        if let Err(kind) = result {
            if stream_error_ends_connection(kind) {
                break;
            }
        }
    }
}

/// Sends one GET to `target` on a new QUIC connection and returns the response status.
pub(super) async fn probe(shared: &Shared) -> Result<u16, ErrorKind> {
    let endpoint = client_endpoint(shared.config.target).map_err(|_| ErrorKind::Connect)?;
    let recorder = RefCell::new(Recorder::new());
    let (mut client, driver) = open(shared, &endpoint, &recorder).await?;
    let result = exchange(&mut client, &shared.h2_uri).await;
    drop(client);
    driver.abort();
    endpoint.close(0u32.into(), b"probe done");
    result
}

/// Completes a QUIC handshake with ALPN `h3`, starts the HTTP/3 connection, and drives it on a
/// local task, whose handle is returned to stop it.
async fn open(
    shared: &Shared,
    endpoint: &quinn::Endpoint,
    recorder: &RefCell<Recorder>,
) -> Result<(H3Client, tokio::task::JoinHandle<()>), ErrorKind> {
    let Some(quic) = &shared.quic else {
        return Err(ErrorKind::QuicHandshake);
    };
    let connecting = endpoint
        .connect_with(quic.clone(), shared.config.target, &shared.config.host)
        .map_err(|_| ErrorKind::Connect)?;
    let connection = connecting.await.map_err(|e| match e {
        quinn::ConnectionError::TimedOut => ErrorKind::Timeout,
        _ => ErrorKind::QuicHandshake,
    })?;
    {
        let mut recorder = recorder.borrow_mut();
        if recorder.tls_session.is_none() {
            recorder.tls_session = Some(describe_session(&connection));
        }
    }
    let (mut driver, client) = h3::client::new(h3_quinn::Connection::new(connection))
        .await
        .map_err(|e| connection_error_kind(&e))?;
    let driver = tokio::task::spawn_local(async move {
        let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
    });
    Ok((client, driver))
}

/// Sends one GET with no body on a new stream of `client` and reads the whole response body.
/// Returns the status, whatever it is.
async fn exchange(client: &mut H3Client, uri: &http::Uri) -> Result<u16, ErrorKind> {
    let request = http::Request::get(uri.clone())
        .header(http::header::USER_AGENT, "edge-bench")
        .body(())
        .map_err(|_| ErrorKind::H3Protocol)?;
    let mut stream = client
        .send_request(request)
        .await
        .map_err(|e| stream_error_kind(&e))?;
    stream.finish().await.map_err(|e| stream_error_kind(&e))?;
    let response = stream
        .recv_response()
        .await
        .map_err(|e| stream_error_kind(&e))?;
    let mut received = 0;
    while let Some(mut chunk) = stream
        .recv_data()
        .await
        .map_err(|e| stream_error_kind(&e))?
    {
        received += chunk.remaining();
        if received > MAX_RESPONSE_BYTES {
            return Err(ErrorKind::InvalidResponse);
        }
        chunk.advance(chunk.remaining());
    }
    Ok(response.status().as_u16())
}

/// Describes the QUIC handshake: QUIC always uses TLS 1.3, and quinn exposes the ALPN protocol
/// but not the cipher suite.
fn describe_session(connection: &quinn::Connection) -> String {
    let alpn = connection
        .handshake_data()
        .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|data| data.protocol)
        .map_or_else(
            || "none".to_owned(),
            |p| String::from_utf8_lossy(&p).into_owned(),
        );
    format!("QUIC with TLSv1_3, ALPN {alpn}")
}

/// Maps an error of a request stream to the kind counted in the report.
fn stream_error_kind(error: &h3::error::StreamError) -> ErrorKind {
    match error {
        h3::error::StreamError::RemoteTerminate { .. } => ErrorKind::StreamReset,
        h3::error::StreamError::RemoteClosing { .. } => ErrorKind::GoAway,
        h3::error::StreamError::ConnectionError { 0: e, .. } => connection_error_kind(e),
        _ => ErrorKind::H3Protocol,
    }
}

/// Maps an error of the whole HTTP/3 connection to the kind counted in the report.
fn connection_error_kind(error: &h3::error::ConnectionError) -> ErrorKind {
    match error {
        h3::error::ConnectionError::Timeout { .. } => ErrorKind::Timeout,
        h3::error::ConnectionError::Remote { .. } => ErrorKind::QuicConnectionLost,
        _ => ErrorKind::H3Protocol,
    }
}
