//! The client's side of `NBD_OPT_STARTTLS`: the greeting and the client's flags in clear, then
//! STARTTLS and nothing else, then the TLS handshake, which checks the server's certificate
//! against the CA and the host name ([`ClientTls`]). The negotiation goes on over TLS from the
//! options on (`negotiate.rs`, told the flags already sent). A server that refuses STARTTLS
//! ends the connection with its reason: this client never falls back to clear text.

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_rustls::client::TlsStream;

use super::{negotiate, ClientError, Result};
use crate::proto::consts::{opt, rep};
use crate::proto::handshake::OptionHeader;
use crate::ClientTls;

/// Upgrade `stream`, connected to `host` (`None`: a Unix socket), to TLS; returns it with the
/// client flags sent.
pub(super) async fn start<S>(mut stream: S, tls: &ClientTls, host: Option<&str>) -> Result<(TlsStream<S>, u32)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let name = tls.server_name(host).ok_or_else(|| {
        ClientError::Invalid(
            "a Unix socket has no host name to check the server's certificate against: give one (tls-hostname=NAME, ClientTls::hostname)"
                .into(),
        )
    })?;
    let server_name =
        ServerName::try_from(name.clone()).map_err(|_| ClientError::Invalid(format!("'{name}' is not a host name")))?;
    let flags = negotiate::greeting(&mut stream).await?;
    let mut out = flags.to_be_bytes().to_vec();
    OptionHeader::encode(&mut out, opt::STARTTLS, &[]);
    stream.write_all(&out).await?;
    stream.flush().await?;
    let (h, data) = negotiate::read_option_reply(&mut stream, opt::STARTTLS).await?;
    match h.reply {
        rep::ACK => {}
        e if e & rep::ERR_BIT != 0 => return Err(negotiate::refused(opt::STARTTLS, e, &data)),
        other => return Err(ClientError::Protocol(format!("unexpected reply {other:#x} to STARTTLS"))),
    }
    let upgraded = tls.connector().connect(server_name, stream).await?;
    Ok((upgraded, flags))
}
