//! WebSocket through the edge: a tungstenite client and server exchange messages over the
//! HTTP/1.1 upgrade tunnel, and the tunnel closes from either side and when idle.

mod common;

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    thread,
    time::Duration,
};

use common::{routes_yaml, Edge};
use tungstenite::{
    client::client,
    protocol::{frame::coding::CloseCode, CloseFrame},
    Message, WebSocket,
};

/// Starts a WebSocket server that echoes messages and closes with code 1000 when it receives
/// the text `close-me`. Returns its address and a channel that reports how each connection
/// ended.
fn echo_server() -> (SocketAddr, std::sync::mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            let tx = tx.clone();
            thread::spawn(move || {
                let mut ws = tungstenite::accept(stream).unwrap();
                let ending = loop {
                    match ws.read() {
                        Ok(Message::Text(text)) if text.as_str() == "close-me" => {
                            let _ = ws.close(Some(CloseFrame {
                                code: CloseCode::Normal,
                                reason: "server done".into(),
                            }));
                            // Read until the client's close reply ends the connection.
                            while ws.read().is_ok() {}
                            break "server closed".to_owned();
                        }
                        Ok(message @ (Message::Text(_) | Message::Binary(_))) => {
                            ws.send(message).unwrap();
                        }
                        Ok(Message::Close(frame)) => {
                            let code = frame.map(|f| u16::from(f.code)).unwrap_or(0);
                            // tungstenite queued the close reply, so flush it out.
                            let _ = ws.flush();
                            break format!("client closed {code}");
                        }
                        Ok(_) => {}
                        Err(e) => break format!("error: {e}"),
                    }
                };
                let _ = tx.send(ending);
            });
        }
    });
    (addr, rx)
}

fn connect(edge: &Edge) -> WebSocket<TcpStream> {
    let stream = TcpStream::connect(edge.http).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let (ws, response) = client("ws://ws.test/chat", stream).unwrap();
    assert_eq!(response.status(), 101);
    ws
}

fn ws_edge(name: &str, backend: SocketAddr, extra: &[&str]) -> Edge {
    let url = format!("http://{backend}");
    let routes = routes_yaml(&[("ws", "Host(`ws.test`)", &url)]);
    Edge::start(name, &routes, extra)
}

#[test]
fn websocket_messages_and_client_close() {
    let (backend, endings) = echo_server();
    let edge = ws_edge("ws-client-close", backend, &[]);
    let mut ws = connect(&edge);

    ws.send(Message::text("hello")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("hello"));
    let binary = vec![7u8; 100_000];
    ws.send(Message::binary(binary.clone())).unwrap();
    assert_eq!(ws.read().unwrap(), Message::binary(binary));

    ws.close(Some(CloseFrame {
        code: CloseCode::Away,
        reason: "bye".into(),
    }))
    .unwrap();
    // The server's close reply comes back through the tunnel, then the stream ends.
    let reply = loop {
        match ws.read() {
            Ok(Message::Close(frame)) => break frame,
            Ok(_) => {}
            Err(e) => panic!("no close reply: {e}"),
        }
    };
    assert_eq!(reply.map(|f| f.code), Some(CloseCode::Away));
    assert!(matches!(
        ws.read(),
        Err(tungstenite::Error::ConnectionClosed)
    ));
    let ending = endings.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(ending, "client closed 1001");
}

#[test]
fn websocket_server_close_reaches_client() {
    let (backend, endings) = echo_server();
    let edge = ws_edge("ws-server-close", backend, &[]);
    let mut ws = connect(&edge);

    ws.send(Message::text("close-me")).unwrap();
    let frame = loop {
        match ws.read() {
            Ok(Message::Close(frame)) => break frame,
            Ok(_) => {}
            Err(e) => panic!("no close frame from the server: {e}"),
        }
    };
    let frame = frame.expect("the close frame has a code");
    assert_eq!(frame.code, CloseCode::Normal);
    assert_eq!(frame.reason.as_str(), "server done");
    // tungstenite replies to the close, and the tunnel then closes from the server side.
    loop {
        match ws.read() {
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("unexpected error after close: {e}"),
        }
    }
    let ending = endings.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(ending, "server closed");
}

#[test]
fn idle_websocket_tunnel_is_closed() {
    let (backend, endings) = echo_server();
    let edge = ws_edge("ws-idle", backend, &["--body-idle-timeout", "1s"]);
    let mut ws = connect(&edge);
    ws.send(Message::text("ping")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("ping"));

    // Nothing is sent either way: the edge closes the tunnel after the idle timeout, which
    // the client sees as the end of the stream, long before its own 15 s read timeout.
    let result = ws.read();
    assert!(
        matches!(
            result,
            Err(tungstenite::Error::Protocol(
                tungstenite::error::ProtocolError::ResetWithoutClosingHandshake
            )) | Err(tungstenite::Error::ConnectionClosed)
        ),
        "read after idle: {result:?}"
    );
    let ending = endings.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(ending.starts_with("error"), "server saw: {ending}");
}
