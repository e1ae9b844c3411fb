//! The floor for the proxy benchmark: an HTTP/1.1 forward proxy on the
//! stack palisade's proxy uses (hyper 1.x server, tokio, mimalloc), laid
//! out as palisade's is: one serving thread per core, each with its own
//! event loop and its own listening socket (`SO_REUSEPORT`), and each
//! client connection with its own origin connection. It forwards
//! absolute-form requests with the origin-form target and does nothing
//! else: no policy, no name checks, no audit trail, no limits, no header
//! rewriting. Bodies are read whole (the benchmark's are 1 KiB). A CONNECT
//! is answered 200 and relayed with `copy_bidirectional` (the harness
//! checks that a peer can tunnel before it measures it).
//!
//!     palisade-bench-floor 127.0.0.1:13998
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Origin = hyper::client::conn::http1::SendRequest<Full<Bytes>>;
type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() {
    let listen: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:13998".into())
        .parse()
        .expect("usage: palisade-bench-floor ADDR:PORT");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads: Vec<_> = (0..cores)
        .map(|_| {
            std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .build()
                    .unwrap()
                    .block_on(serve(listen))
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

async fn serve(listen: SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseport(true).unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind(listen).unwrap();
    let listener: TcpListener = socket.listen(4096).unwrap();
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let _ = client.set_nodelay(true);
        tokio::spawn(async move {
            let origin: Arc<Mutex<Option<Origin>>> = Arc::new(Mutex::new(None));
            let service = hyper::service::service_fn(move |req| forward(origin.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(client), service)
                .with_upgrades()
                .await;
        });
    }
}

async fn forward(
    origin: Arc<Mutex<Option<Origin>>>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Error> {
    let authority = req
        .uri()
        .authority()
        .ok_or("not absolute-form")?
        .as_str()
        .to_string();
    if req.method() == hyper::Method::CONNECT {
        let mut upstream = TcpStream::connect(&authority).await?;
        tokio::spawn(async move {
            if let Ok(client) = hyper::upgrade::on(req).await {
                let mut client = TokioIo::new(client);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            }
        });
        return Ok(Response::new(Full::new(Bytes::new())));
    }
    let (mut parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    parts.uri = parts
        .uri
        .path_and_query()
        .ok_or("no path")?
        .as_str()
        .parse()?;
    let mut slot = origin.lock().await;
    if slot.as_ref().is_none_or(|o| o.is_closed()) {
        let stream = TcpStream::connect(&authority).await?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        *slot = Some(sender);
    }
    let sender = slot.as_mut().ok_or("no origin")?;
    let response = sender
        .send_request(Request::from_parts(parts, Full::new(body)))
        .await?;
    let (head, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Response::from_parts(head, Full::new(body)))
}
