//! The handover inside one process: two proxies, a real upgrade socket, real listening
//! sockets passed with `SCM_RIGHTS`.

use super::{listen, serve, take_over, UpgradeError};
use crate::Proxy;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const STEP: Duration = Duration::from_secs(10);

async fn echo_backend() -> std::net::SocketAddr {
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = tcp.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

fn config(echo: std::net::SocketAddr) -> spur_config::Config {
    let yaml = format!(
        "drain_timeout: 5s\nadmin: {{ listen: \"127.0.0.1:0\" }}\nlisteners:\n  - {{ name: raw, listen: \"127.0.0.1:0\", protocol: tcp, cluster: echo }}\nclusters:\n  - {{ name: echo, endpoints: [\"{echo}\"] }}\n"
    );
    spur_config::load(&yaml, Some("test.yaml")).unwrap()
}

async fn echoes(addr: std::net::SocketAddr) -> bool {
    let Ok(Ok(mut s)) = tokio::time::timeout(STEP, TcpStream::connect(addr)).await else {
        return false;
    };
    let mut buf = [0u8; 4];
    s.write_all(b"ping").await.is_ok()
        && tokio::time::timeout(STEP, s.read_exact(&mut buf))
            .await
            .is_ok_and(|r| r.is_ok())
        && &buf == b"ping"
}

#[tokio::test]
async fn a_new_proxy_takes_the_sockets_and_the_old_one_steps_down() {
    let echo = echo_backend().await;
    let old = Arc::new(Proxy::start(config(echo)).await.unwrap());
    let raw = old.listener_addr("raw").unwrap();
    let admin = old.admin_addr().unwrap();
    let dir = std::env::temp_dir().join(format!("spur-upgrade-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("u.sock");
    let _ = std::fs::remove_file(&path);
    let mut upgraded = serve(old.clone(), listen(&path, false).unwrap());
    assert!(echoes(raw).await);

    // A second proxy without --upgrade may not take a live proxy's socket path.
    assert!(matches!(
        listen(&path, false),
        Err(UpgradeError::InUse { .. })
    ));

    let (takeover, inherited) = take_over(&path).await.unwrap();
    assert_eq!(takeover.pid, std::process::id());
    // One upgrade at a time.
    match take_over(&path).await {
        Err(UpgradeError::Refused { message, .. }) => {
            assert!(message.contains("already in progress"), "{message}")
        }
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
    let new = Proxy::idle().unwrap();
    new.inherit(inherited).await;
    new.apply(config(echo), 0).await.unwrap();
    // Port 0 in the config, yet the same ports: the sockets were passed, not bound anew.
    assert_eq!(new.listener_addr("raw"), Some(raw));
    assert_eq!(new.admin_addr(), Some(admin));

    takeover.finish().await.unwrap();
    tokio::time::timeout(STEP, upgraded.wait())
        .await
        .expect("the old proxy hears that it must drain");
    tokio::time::timeout(STEP, old.shutdown_for_upgrade())
        .await
        .expect("nothing open: the old proxy stops at once");
    // The old one has stopped; connections still reach the listener, now the new one's.
    for _ in 0..20 {
        assert!(echoes(raw).await, "served by the new proxy");
    }
    new.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
