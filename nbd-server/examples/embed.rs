//! Embed an NBD export in a tokio program, talk to it with the crate's client, read its
//! counters, and shut down cleanly. Run with `cargo run -p nbd-server --example embed`.

use std::sync::Arc;

use nbd_server::{Client, ExportConfig, MemoryBackend, Server, ServerConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // A server with one 64 MiB in-memory export that four connections may share.
    let server = Server::new(ServerConfig::default());
    server.add_export(ExportConfig::new("scratch", Arc::new(MemoryBackend::new(64 << 20))).max_connections(4))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let accept = tokio::spawn({
        let server = server.clone();
        async move { server.serve(listener).await }
    });
    println!("serving nbd://{addr}/scratch");

    // Any NBD client works (nbdinfo, qemu-img, nbdcopy); here, the crate's own.
    let client = Client::connect_tcp(addr, "scratch").await?;
    println!("negotiated: extended headers {}, block status {}", client.extended_headers(), client.can_block_status());
    client.write(1 << 20, &[0xab; 4096], false).await?;
    client.flush().await?;
    let extents = client.block_status(0, 4 << 20).await?;
    println!("first extents: {:?}", &extents[..extents.len().min(3)]);
    assert_eq!(client.read(1 << 20, 4096).await?, vec![0xab; 4096]);
    client.disconnect().await?;

    // Withdraw the export: its connections drain, it is flushed, and its final counters come back.
    let stats = server.remove_export("scratch").await?;
    println!("counters: {stats:?}");
    server.shutdown().await?; // stops the listener; would drain and flush any remaining export
    accept.await?;
    Ok(())
}
