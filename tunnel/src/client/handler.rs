//! The client side of one SSH connection to the hub, as russh calls it: the host key checked
//! against the pinned one, channel data no larger than the packets we advertised, the hub's
//! reverse-forwarded channels connected to their local targets (only the forwards configured),
//! and every other kind of channel the hub might open refused.

use std::sync::{Arc, Mutex};

use russh::client::{self, ChannelOpenHandle, Msg};
use russh::Channel;
use tokio::net::TcpStream;

use super::{pump, Shared};
use crate::hostkey::{self, HostKeyPolicy};
use crate::spec::ReverseForward;

/// The client side of one SSH connection: host key check and reverse-forwarded channels.
pub(crate) struct HubHandler {
    pub(super) policy: HostKeyPolicy,
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) reverse: Arc<Vec<ReverseForward>>,
    pub(super) key_error: Arc<Mutex<Option<hostkey::HostKeyError>>>,
    pub(super) shared: Arc<Shared>,
}

impl HubHandler {
    /// Disconnect a hub that sent more channel data in one packet than we advertised (see
    /// [`crate::limits`]).
    fn within_packet(&self, channel: russh::ChannelId, len: usize) -> Result<(), russh::Error> {
        if crate::limits::packet_within(len, crate::limits::CLIENT_MAX_PACKET) {
            return Ok(());
        }
        tracing::warn!(hub = %self.host, ?channel, len, "disconnecting: channel data larger than the advertised maximum packet");
        Err(russh::Error::PacketSize(len))
    }
}

impl client::Handler for HubHandler {
    type Error = russh::Error;

    async fn data(
        &mut self,
        channel: russh::ChannelId,
        data: &[u8],
        _: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.within_packet(channel, data.len())
    }

    async fn extended_data(
        &mut self,
        channel: russh::ChannelId,
        _code: u32,
        data: &[u8],
        _: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.within_packet(channel, data.len())
    }

    async fn check_server_key(&mut self, key: &russh::keys::PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        let russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            return Ok(false);
        };
        match hostkey::verify(&self.policy, &self.host, self.port, key) {
            Ok(()) => Ok(true),
            Err(e) => {
                if let Ok(mut slot) = self.key_error.lock() {
                    *slot = Some(e);
                }
                Ok(false)
            }
        }
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<Msg>,
        connected_address: &str,
        connected_port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let Some(target) = self.reverse.iter().find(|r| u32::from(r.remote_port) == connected_port).map(|r| r.local)
        else {
            tracing::warn!(%connected_address, connected_port, "hub opened a reverse channel we did not ask for; refusing");
            return Ok(()); // dropping `reply` rejects
        };
        let shared = Arc::clone(&self.shared);
        // Never wait on a connect inside the handler: it would stall the whole session.
        tokio::spawn(async move {
            match TcpStream::connect(target).await {
                Ok(tcp) => {
                    reply.accept().await;
                    let _ = tcp.set_nodelay(true);
                    pump(tcp, channel, &shared).await;
                }
                Err(e) => tracing::warn!(%target, error = %e, "reverse forward target unreachable"),
            }
        });
        Ok(())
    }

    // Channels the hub may try to open on its own. russh accepts them by default; a node asks
    // for nothing but its reverse forwards, so every one of them is refused.
    async fn server_channel_open_session(
        &mut self,
        _channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse(reply, "session").await;
        Ok(())
    }

    async fn server_channel_open_direct_tcpip(
        &mut self,
        _channel: Channel<Msg>,
        _host_to_connect: &str,
        _port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse(reply, "direct-tcpip").await;
        Ok(())
    }

    async fn server_channel_open_x11(
        &mut self,
        _channel: Channel<Msg>,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse(reply, "x11").await;
        Ok(())
    }

    async fn server_channel_open_agent_forward(
        &mut self,
        _channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse(reply, "agent").await;
        Ok(())
    }

    async fn server_channel_open_forwarded_streamlocal(
        &mut self,
        _channel: Channel<Msg>,
        _socket_path: &str,
        reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse(reply, "forwarded-streamlocal").await;
        Ok(())
    }

    async fn server_channel_open_direct_streamlocal(
        &mut self,
        _channel: Channel<Msg>,
        _socket_path: &str,
        reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse(reply, "direct-streamlocal").await;
        Ok(())
    }
}

async fn refuse(reply: ChannelOpenHandle, kind: &str) {
    tracing::warn!(kind, "the hub opened a channel a node never accepts; refused");
    reply.reject(russh::ChannelOpenFailure::AdministrativelyProhibited).await;
}
