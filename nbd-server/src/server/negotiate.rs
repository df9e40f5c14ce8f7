//! Option haggling as a pure state machine: one option in, reply bytes and a next step out.
//!
//! [`Negotiator::handle`] never touches a socket, so the whole fixed-newstyle negotiation is
//! unit-tested and fuzzed without I/O; `connection.rs` only moves bytes. Which exports a client
//! can see is decided by the [`Scope`] of the listener it came through: the whole registry, or
//! one export (the hub's one-port-per-disk layout, where the default name "" means that export),
//! or none at all for a client its listener does not admit, which is told why in the answer to
//! every export it asks for (`NBD_REP_ERR_POLICY`), so it fails at once with the reason instead
//! of retrying a connection that was cut.
//!
//! TLS ([`Tls`]) is the spec's FORCEDTLS mode when the server has credentials: before
//! `NBD_OPT_STARTTLS` every option but `ABORT` is answered `NBD_REP_ERR_TLS_REQD` (and
//! `EXPORT_NAME`, which has no error reply, ends the connection), so nothing of an export, not
//! even its name, crosses the wire in clear; after the TLS handshake the connection starts again
//! with a fresh negotiator, as the spec demands (no state from before the upgrade survives).

use std::sync::Arc;

use crate::proto::consts::{client_flags, info, opt, rep, BASE_ALLOCATION};
use crate::proto::handshake::{self as hs, encode_option_error, encode_option_reply};
use crate::proto::transmission::HeaderMode;

use super::export::{ConnectionSlot, Export, Registry};

/// Which exports a listener serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every export of the server, by name.
    All,
    /// Only this export; the empty name selects it too.
    Only(String),
    /// No export: every one asked for is refused with `NBD_REP_ERR_POLICY` and this reason (a
    /// client the listener does not admit, see [`crate::Server::serve_tcp_admitting`]).
    Refused(String),
}

/// Context id we give `base:allocation`.
pub(crate) const ALLOCATION_CONTEXT_ID: u32 = 1;
/// Context id we give an export's first `qemu:dirty-bitmap:NAME`; its bitmap `i` has this
/// plus `i`.
pub(crate) const BITMAP_CONTEXT_ID: u32 = 2;

/// Where a connection stands with TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tls {
    /// The server has no credentials: `NBD_OPT_STARTTLS` is refused with `NBD_REP_ERR_POLICY`.
    Off,
    /// The server has credentials and this connection has not upgraded yet: only `STARTTLS`
    /// (or `ABORT`) is served.
    Required,
    /// The connection runs over TLS: another `STARTTLS` is invalid.
    Active,
}

/// What the connection does after an option.
pub(crate) enum Step {
    /// Keep haggling.
    Continue,
    /// Send the replies (the `ACK`), then run the TLS handshake and negotiate again over it.
    StartTls,
    /// The client aborted; close after sending the replies.
    Abort,
    /// Send the replies and close (EXPORT_NAME with no such export, or no place left).
    Disconnect(String),
    /// Send the replies and enter transmission.
    Enter(Session),
}

/// Everything transmission needs from the handshake.
pub(crate) struct Session {
    pub slot: ConnectionSlot,
    pub mode: HeaderMode,
    pub structured: bool,
    pub allocation_context: Option<u32>,
    /// The export's bitmaps selected, bit `i` for its bitmap `i`.
    pub bitmap_contexts: u64,
    pub flags: u16,
}

/// The metadata contexts a client selected (`NBD_OPT_SET_META_CONTEXT`), for one export.
struct Selected {
    export: String,
    allocation: bool,
    /// Bit `i`: the export's bitmap `i`.
    bitmaps: u64,
}

impl Session {
    pub fn export(&self) -> &Arc<Export> {
        &self.slot.export
    }
}

/// Block size constraints we advertise.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BlockSizes {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

/// Negotiation state of one connection.
pub(crate) struct Negotiator<'a> {
    registry: &'a Registry,
    scope: &'a Scope,
    sizes: BlockSizes,
    tls: Tls,
    no_zeroes: bool,
    structured: bool,
    extended: bool,
    /// The contexts last selected, and for which export (canonical name).
    meta: Option<Selected>,
}

impl<'a> Negotiator<'a> {
    /// A negotiator of a server without TLS (the unit tests' usual one).
    #[cfg(test)]
    pub fn new(registry: &'a Registry, scope: &'a Scope, sizes: BlockSizes, client_flags_value: u32) -> Self {
        Self::with_tls(registry, scope, sizes, client_flags_value, Tls::Off)
    }

    /// [`Negotiator::new`] at the given point of a TLS server's negotiation.
    pub fn with_tls(
        registry: &'a Registry,
        scope: &'a Scope,
        sizes: BlockSizes,
        client_flags_value: u32,
        tls: Tls,
    ) -> Self {
        Self {
            registry,
            scope,
            sizes,
            tls,
            no_zeroes: client_flags_value & client_flags::NO_ZEROES != 0,
            structured: false,
            extended: false,
            meta: None,
        }
    }

    /// Client flags we accept: anything else ends the connection (the spec's MUST).
    pub fn client_flags_valid(value: u32) -> bool {
        value & !(client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES) == 0
    }

    fn resolve(&self, name: &str) -> Option<Arc<Export>> {
        match self.scope {
            Scope::All => self.registry.get(name),
            Scope::Only(only) if name.is_empty() || name == only => self.registry.get(only),
            Scope::Only(_) | Scope::Refused(_) => None,
        }
    }

    fn visible(&self) -> Vec<Arc<Export>> {
        match self.scope {
            Scope::All => self.registry.all(),
            Scope::Only(only) => self.registry.get(only).into_iter().collect(),
            Scope::Refused(_) => Vec::new(),
        }
    }

    fn unknown_export(&self, out: &mut Vec<u8>, option: u32, name: &str) {
        if let Scope::Refused(reason) = self.scope {
            encode_option_error(out, option, rep::ERR_POLICY, reason);
            return;
        }
        if let Scope::Only(only) = self.scope {
            if name.is_empty() || name == only {
                // The listener's own export is not there: it is being removed (the client was
                // accepted just before), or not added yet. The spec's "shutting down" says "try
                // again", which a client may act on; "unknown" would say the name is wrong.
                let message = format!("export '{}' is closing or not open yet: try again", only.escape_debug());
                encode_option_error(out, option, rep::ERR_SHUTDOWN, &message);
                return;
            }
        }
        let names: Vec<String> = self.visible().iter().map(|e| format!("'{}'", e.name)).collect();
        let list = if names.is_empty() { "none".to_string() } else { names.join(", ") };
        encode_option_error(
            out,
            option,
            rep::ERR_UNKNOWN,
            &format!("no export named '{}' (available: {list})", name.escape_debug()),
        );
    }

    /// Handle one option with its data, appending replies to `out`.
    pub fn handle(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) -> Step {
        if self.tls == Tls::Required {
            return Self::before_tls(option, data, out);
        }
        match option {
            opt::EXPORT_NAME => self.export_name(data, out),
            opt::ABORT => {
                encode_option_reply(out, option, rep::ACK, &[]);
                Step::Abort
            }
            opt::LIST => {
                if !data.is_empty() {
                    encode_option_error(out, option, rep::ERR_INVALID, "NBD_OPT_LIST takes no data");
                    return Step::Continue;
                }
                for e in self.visible() {
                    encode_option_reply(out, option, rep::SERVER, &hs::server_reply(&e.name, &e.description));
                }
                encode_option_reply(out, option, rep::ACK, &[]);
                Step::Continue
            }
            opt::STARTTLS => {
                if !data.is_empty() {
                    encode_option_error(out, option, rep::ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
                } else if self.tls == Tls::Active {
                    encode_option_error(out, option, rep::ERR_INVALID, "TLS is already negotiated");
                } else {
                    encode_option_error(out, option, rep::ERR_POLICY, "TLS is not enabled on this server");
                }
                Step::Continue
            }
            opt::INFO | opt::GO => self.info_or_go(option, data, out),
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    encode_option_error(out, option, rep::ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data");
                } else if self.structured {
                    encode_option_error(out, option, rep::ERR_INVALID, "structured replies already negotiated");
                } else {
                    self.structured = true;
                    encode_option_reply(out, option, rep::ACK, &[]);
                }
                Step::Continue
            }
            opt::EXTENDED_HEADERS => {
                if !data.is_empty() {
                    encode_option_error(out, option, rep::ERR_INVALID, "NBD_OPT_EXTENDED_HEADERS takes no data");
                } else if self.extended {
                    encode_option_error(out, option, rep::ERR_INVALID, "extended headers already negotiated");
                } else {
                    self.extended = true;
                    self.structured = true;
                    encode_option_reply(out, option, rep::ACK, &[]);
                }
                Step::Continue
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => self.meta_context(option, data, out),
            other => {
                encode_option_error(out, other, rep::ERR_UNSUP, &format!("option {other} is not supported"));
                Step::Continue
            }
        }
    }

    /// A TLS server's answer to an option sent in clear (module doc).
    fn before_tls(option: u32, data: &[u8], out: &mut Vec<u8>) -> Step {
        match option {
            opt::STARTTLS if data.is_empty() => {
                encode_option_reply(out, option, rep::ACK, &[]);
                Step::StartTls
            }
            opt::STARTTLS => {
                encode_option_error(out, option, rep::ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
                Step::Continue
            }
            opt::ABORT => {
                encode_option_reply(out, option, rep::ACK, &[]);
                Step::Abort
            }
            opt::EXPORT_NAME => Step::Disconnect("NBD_OPT_EXPORT_NAME before TLS on a server that requires it".into()),
            other => {
                encode_option_error(
                    out,
                    other,
                    rep::ERR_TLS_REQD,
                    "this server requires TLS: send NBD_OPT_STARTTLS first (nbds:// URIs, qemu's tls-creds)",
                );
                Step::Continue
            }
        }
    }

    fn export_name(&mut self, data: &[u8], out: &mut Vec<u8>) -> Step {
        let name = match std::str::from_utf8(data) {
            Ok(n) if n.len() <= crate::proto::consts::MAX_STRING_LEN => n,
            _ => return Step::Disconnect("NBD_OPT_EXPORT_NAME with an invalid name".into()),
        };
        let Some(export) = self.resolve(name) else {
            if let Scope::Refused(reason) = self.scope {
                return Step::Disconnect(reason.clone());
            }
            return Step::Disconnect(format!("NBD_OPT_EXPORT_NAME asked for unknown export '{}'", name.escape_debug()));
        };
        let Some(slot) = export.attach() else {
            return Step::Disconnect(format!(
                "export '{}' already has its limit of {} connections",
                export.name, export.max_connections
            ));
        };
        // EXPORT_NAME clients cannot have negotiated structured replies meaningfully... they can,
        // in fixed newstyle; honour what they negotiated.
        let flags = export.transmission_flags(self.structured);
        out.extend_from_slice(&hs::export_name_reply(export.size(), flags, self.no_zeroes));
        Step::Enter(self.session(slot, flags))
    }

    fn session(&self, slot: ConnectionSlot, flags: u16) -> Session {
        let selected = self.meta.as_ref().filter(|m| self.structured && m.export == slot.export.name);
        let allocation_context = selected.filter(|m| m.allocation).map(|_| ALLOCATION_CONTEXT_ID);
        let bitmap_contexts = selected.map_or(0, |m| m.bitmaps);
        Session {
            mode: if self.extended { HeaderMode::Extended } else { HeaderMode::Compact },
            structured: self.structured,
            allocation_context,
            bitmap_contexts,
            flags,
            slot,
        }
    }

    fn info_or_go(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) -> Step {
        let req = match hs::parse_info_request(data) {
            Ok(r) => r,
            Err(e) => {
                encode_option_error(out, option, rep::ERR_INVALID, &e.to_string());
                return Step::Continue;
            }
        };
        let Some(export) = self.resolve(req.name) else {
            self.unknown_export(out, option, req.name);
            return Step::Continue;
        };
        let slot = if option == opt::GO {
            match export.attach() {
                Some(slot) => Some(slot),
                None => {
                    encode_option_error(
                        out,
                        option,
                        rep::ERR_POLICY,
                        &format!(
                            "export '{}' already has its limit of {} connections; try again later",
                            export.name, export.max_connections
                        ),
                    );
                    return Step::Continue;
                }
            }
        } else {
            None
        };
        let flags = export.transmission_flags(self.structured);
        encode_option_reply(out, option, rep::INFO, &hs::info_export(export.size(), flags));
        if req.requests.contains(&info::NAME) || req.name != export.name {
            encode_option_reply(out, option, rep::INFO, &hs::info_string(info::NAME, &export.name));
        }
        if !export.description.is_empty() {
            encode_option_reply(out, option, rep::INFO, &hs::info_string(info::DESCRIPTION, &export.description));
        }
        let s = self.sizes;
        encode_option_reply(out, option, rep::INFO, &hs::info_block_size(s.minimum, s.preferred, s.maximum));
        encode_option_reply(out, option, rep::ACK, &[]);
        match slot {
            Some(slot) => Step::Enter(self.session(slot, flags)),
            None => Step::Continue,
        }
    }

    fn meta_context(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) -> Step {
        let setting = option == opt::SET_META_CONTEXT;
        if setting {
            // SET replaces the selection even when it fails.
            self.meta = None;
        }
        if !self.structured {
            encode_option_error(out, option, rep::ERR_INVALID, "negotiate structured replies before metadata contexts");
            return Step::Continue;
        }
        let req = match hs::parse_meta_context_request(data) {
            Ok(r) => r,
            Err(e) => {
                encode_option_error(out, option, rep::ERR_INVALID, &e.to_string());
                return Step::Continue;
            }
        };
        let Some(export) = self.resolve(req.export) else {
            self.unknown_export(out, option, req.export);
            return Step::Continue;
        };
        // What the export offers: `base:allocation`, and its dirty bitmaps.
        let bitmaps: Vec<String> = export.bitmaps.iter().map(|b| format!("qemu:dirty-bitmap:{b}")).collect();
        let mut offered = vec![(ALLOCATION_CONTEXT_ID, BASE_ALLOCATION)];
        offered.extend(bitmaps.iter().zip(BITMAP_CONTEXT_ID..).map(|(name, id)| (id, name.as_str())));
        // A query names a context, or (listing only) a whole namespace such as "base:" or
        // "qemu:"; listing with no query lists everything, setting with none selects nothing.
        let wanted = |name: &str| {
            if req.queries.is_empty() {
                return !setting;
            }
            req.queries.iter().any(|q| *q == name || (!setting && q.ends_with(':') && name.starts_with(*q)))
        };
        let chosen: Vec<(u32, &str)> = offered.into_iter().filter(|(_, name)| wanted(name)).collect();
        for (id, name) in &chosen {
            let id = if setting { *id } else { 0 };
            encode_option_reply(out, option, rep::META_CONTEXT, &hs::meta_context_reply(id, name));
        }
        if setting {
            self.meta = Some(Selected {
                export: export.name.clone(),
                allocation: chosen.iter().any(|(id, _)| *id == ALLOCATION_CONTEXT_ID),
                bitmaps: chosen
                    .iter()
                    .filter_map(|(id, _)| id.checked_sub(BITMAP_CONTEXT_ID))
                    .fold(0, |mask, i| mask | super::export::bitmap_bit(i as usize)),
            });
        }
        encode_option_reply(out, option, rep::ACK, &[]);
        Step::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemoryBackend;
    use crate::proto::consts::transmission_flags as tf;
    use crate::proto::handshake::{parse_info_item, InfoItem, OptionReplyHeader, OPTION_REPLY_HEADER_LEN};
    use crate::server::export::ExportConfig;
    use tokio_util::sync::CancellationToken;

    const SIZES: BlockSizes = BlockSizes { minimum: 1, preferred: 4096, maximum: 1 << 25 };

    fn registry(limit: usize) -> Registry {
        let r = Registry::default();
        let cfg = ExportConfig::new("disk0", Arc::new(MemoryBackend::new(1 << 20)))
            .max_connections(limit)
            .description("test disk");
        assert!(r.insert(Arc::new(Export::new(cfg, CancellationToken::new(), CancellationToken::new()))).is_ok());
        r
    }

    fn replies(mut bytes: &[u8]) -> Vec<(OptionReplyHeader, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let head: [u8; OPTION_REPLY_HEADER_LEN] = bytes[..OPTION_REPLY_HEADER_LEN].try_into().unwrap();
            let h = OptionReplyHeader::parse(&head).unwrap();
            let end = OPTION_REPLY_HEADER_LEN + h.length as usize;
            out.push((h, bytes[OPTION_REPLY_HEADER_LEN..end].to_vec()));
            bytes = &bytes[end..];
        }
        out
    }

    #[test]
    fn go_enters_transmission_with_export_info_and_block_sizes() {
        let reg = registry(2);
        let scope = Scope::All;
        let mut n = Negotiator::new(&reg, &scope, SIZES, 3);
        let mut out = Vec::new();
        assert!(matches!(n.handle(opt::STRUCTURED_REPLY, &[], &mut out), Step::Continue));
        let step = n.handle(opt::GO, &hs::encode_info_request("disk0", &[info::BLOCK_SIZE]), &mut out);
        let Step::Enter(session) = step else { panic!("GO did not enter transmission") };
        assert!(session.structured);
        assert_eq!(session.allocation_context, None);
        let items: Vec<InfoItem> = replies(&out)
            .iter()
            .filter(|(h, _)| h.reply == rep::INFO)
            .map(|(_, d)| parse_info_item(d).unwrap())
            .collect();
        assert!(items.contains(&InfoItem::Export { size: 1 << 20, flags: session.flags }));
        assert!(items.contains(&InfoItem::BlockSize { minimum: 1, preferred: 4096, maximum: 1 << 25 }));
        assert!(session.flags & tf::CAN_MULTI_CONN != 0);
        assert!(session.flags & tf::SEND_DF != 0);
    }

    #[test]
    fn a_server_requiring_tls_serves_nothing_but_starttls_in_clear() {
        let reg = registry(2);
        let scope = Scope::All;
        let mut n = Negotiator::with_tls(&reg, &scope, SIZES, 1, Tls::Required);
        for (option, data) in [
            (opt::GO, hs::encode_info_request("disk0", &[])),
            (opt::INFO, hs::encode_info_request("disk0", &[])),
            (opt::LIST, Vec::new()),
            (opt::STRUCTURED_REPLY, Vec::new()),
            (opt::SET_META_CONTEXT, Vec::new()),
            (99, Vec::new()),
        ] {
            let mut out = Vec::new();
            assert!(matches!(n.handle(option, &data, &mut out), Step::Continue), "option {option}");
            let r = replies(&out);
            assert_eq!((r.len(), r[0].0.reply), (1, rep::ERR_TLS_REQD), "option {option}");
            assert!(!String::from_utf8_lossy(&r[0].1).contains("disk0"), "no export named in clear");
        }
        assert!(matches!(n.handle(opt::EXPORT_NAME, b"disk0", &mut Vec::new()), Step::Disconnect(_)));
        let mut out = Vec::new();
        assert!(matches!(n.handle(opt::STARTTLS, b"x", &mut out), Step::Continue));
        assert_eq!(replies(&out)[0].0.reply, rep::ERR_INVALID);
        let mut out = Vec::new();
        assert!(matches!(n.handle(opt::STARTTLS, &[], &mut out), Step::StartTls));
        assert_eq!(replies(&out)[0].0.reply, rep::ACK);

        // Over TLS: a fresh negotiator serves the export; STARTTLS again is invalid.
        let mut over = Negotiator::with_tls(&reg, &scope, SIZES, 1, Tls::Active);
        let mut out = Vec::new();
        assert!(matches!(over.handle(opt::STARTTLS, &[], &mut out), Step::Continue));
        assert_eq!(replies(&out)[0].0.reply, rep::ERR_INVALID);
        assert!(matches!(
            over.handle(opt::GO, &hs::encode_info_request("disk0", &[]), &mut Vec::new()),
            Step::Enter(_)
        ));
        // And a server without credentials refuses STARTTLS by policy.
        let mut off = Negotiator::new(&reg, &scope, SIZES, 1);
        let mut out = Vec::new();
        assert!(matches!(off.handle(opt::STARTTLS, &[], &mut out), Step::Continue));
        assert_eq!(replies(&out)[0].0.reply, rep::ERR_POLICY);
    }

    #[test]
    fn a_client_over_the_connection_limit_gets_a_policy_error_not_a_hang() {
        let reg = registry(1);
        let scope = Scope::All;
        let data = hs::encode_info_request("disk0", &[]);
        let mut first = Negotiator::new(&reg, &scope, SIZES, 1);
        let Step::Enter(_held) = first.handle(opt::GO, &data, &mut Vec::new()) else { panic!() };
        let mut second = Negotiator::new(&reg, &scope, SIZES, 1);
        let mut out = Vec::new();
        assert!(matches!(second.handle(opt::GO, &data, &mut out), Step::Continue));
        let r = replies(&out);
        assert_eq!(r[0].0.reply, rep::ERR_POLICY);
        assert!(String::from_utf8_lossy(&r[0].1).contains("limit of 1"));
        drop(_held);
        assert!(matches!(second.handle(opt::GO, &data, &mut Vec::new()), Step::Enter(_)));
    }

    #[test]
    fn unknown_exports_and_unknown_options_get_errors_and_haggling_goes_on() {
        let reg = registry(1);
        let scope = Scope::All;
        let mut n = Negotiator::new(&reg, &scope, SIZES, 1);
        let mut out = Vec::new();
        assert!(matches!(n.handle(opt::GO, &hs::encode_info_request("nope", &[]), &mut out), Step::Continue));
        assert!(matches!(n.handle(99, b"junk", &mut out), Step::Continue));
        assert!(matches!(n.handle(opt::STARTTLS, &[], &mut out), Step::Continue));
        let r = replies(&out);
        assert_eq!(r[0].0.reply, rep::ERR_UNKNOWN);
        assert!(String::from_utf8_lossy(&r[0].1).contains("'disk0'"));
        assert_eq!(r[1].0.reply, rep::ERR_UNSUP);
        assert_eq!(r[2].0.reply, rep::ERR_POLICY);
    }

    #[test]
    fn base_allocation_is_selected_only_for_the_export_entered() {
        let reg = registry(4);
        let scope = Scope::All;
        let mut n = Negotiator::new(&reg, &scope, SIZES, 1);
        let mut out = Vec::new();
        n.handle(opt::SET_META_CONTEXT, &hs::encode_meta_context_request("disk0", &[BASE_ALLOCATION]), &mut out);
        assert_eq!(replies(&out)[0].0.reply, rep::ERR_INVALID, "needs structured replies first");
        n.handle(opt::EXTENDED_HEADERS, &[], &mut out);
        out.clear();
        n.handle(
            opt::SET_META_CONTEXT,
            &hs::encode_meta_context_request("disk0", &[BASE_ALLOCATION, "qemu:x"]),
            &mut out,
        );
        let r = replies(&out);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].0.reply, rep::META_CONTEXT);
        let Step::Enter(s) = n.handle(opt::GO, &hs::encode_info_request("disk0", &[]), &mut Vec::new()) else {
            panic!()
        };
        assert_eq!(s.allocation_context, Some(ALLOCATION_CONTEXT_ID));
        assert_eq!(s.mode, HeaderMode::Extended);
    }

    #[test]
    fn an_exports_bitmaps_are_listed_and_selected_beside_base_allocation_each_with_its_id() {
        let reg = Registry::default();
        let cfg = ExportConfig::new("disk0", Arc::new(MemoryBackend::new(1 << 20)))
            .bitmaps(vec!["b0".into(), "b1".into()])
            .max_connections(4);
        assert!(reg.insert(Arc::new(Export::new(cfg, CancellationToken::new(), CancellationToken::new()))).is_ok());
        let scope = Scope::All;
        let mut n = Negotiator::new(&reg, &scope, SIZES, 1);
        n.handle(opt::STRUCTURED_REPLY, &[], &mut Vec::new());
        let contexts = |out: &[u8]| {
            replies(out)
                .iter()
                .filter(|(h, _)| h.reply == rep::META_CONTEXT)
                .map(|(_, d)| {
                    (u32::from_be_bytes([d[0], d[1], d[2], d[3]]), String::from_utf8_lossy(&d[4..]).into_owned())
                })
                .collect::<Vec<_>>()
        };
        let listed = |n: &mut Negotiator, queries: &[&str]| {
            let mut out = Vec::new();
            n.handle(opt::LIST_META_CONTEXT, &hs::encode_meta_context_request("disk0", queries), &mut out);
            contexts(&out).into_iter().map(|(_, name)| name).collect::<Vec<_>>()
        };
        assert_eq!(listed(&mut n, &[]), [BASE_ALLOCATION, "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"]);
        assert_eq!(listed(&mut n, &["qemu:"]), ["qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"]);
        assert_eq!(listed(&mut n, &["qemu:dirty-bitmap:b2"]), Vec::<String>::new());
        // Selecting the second bitmap alone: its own id, and no base:allocation.
        let mut out = Vec::new();
        n.handle(
            opt::SET_META_CONTEXT,
            &hs::encode_meta_context_request("disk0", &["qemu:dirty-bitmap:b1", "qemu:"]),
            &mut out,
        );
        assert_eq!(contexts(&out), [(BITMAP_CONTEXT_ID + 1, "qemu:dirty-bitmap:b1".to_string())]);
        let Step::Enter(s) = n.handle(opt::GO, &hs::encode_info_request("disk0", &[]), &mut Vec::new()) else {
            panic!()
        };
        assert_eq!((s.allocation_context, s.bitmap_contexts), (None, 0b10), "a namespace selects nothing");
        // All three, and an export without bitmaps selects only what it has.
        let mut n = Negotiator::new(&reg, &scope, SIZES, 1);
        n.handle(opt::STRUCTURED_REPLY, &[], &mut Vec::new());
        let mut out = Vec::new();
        n.handle(
            opt::SET_META_CONTEXT,
            &hs::encode_meta_context_request(
                "disk0",
                &[BASE_ALLOCATION, "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"],
            ),
            &mut out,
        );
        let ids: Vec<u32> = contexts(&out).into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, [ALLOCATION_CONTEXT_ID, BITMAP_CONTEXT_ID, BITMAP_CONTEXT_ID + 1]);
        let Step::Enter(s) = n.handle(opt::GO, &hs::encode_info_request("disk0", &[]), &mut Vec::new()) else {
            panic!()
        };
        assert_eq!((s.allocation_context, s.bitmap_contexts), (Some(ALLOCATION_CONTEXT_ID), 0b11));
        let plain = registry(4);
        let mut n = Negotiator::new(&plain, &scope, SIZES, 1);
        n.handle(opt::STRUCTURED_REPLY, &[], &mut Vec::new());
        n.handle(
            opt::SET_META_CONTEXT,
            &hs::encode_meta_context_request("disk0", &["qemu:dirty-bitmap:b0"]),
            &mut Vec::new(),
        );
        let Step::Enter(s) = n.handle(opt::GO, &hs::encode_info_request("disk0", &[]), &mut Vec::new()) else {
            panic!()
        };
        assert_eq!((s.allocation_context, s.bitmap_contexts), (None, 0));
    }

    #[test]
    fn a_scoped_listener_serves_only_its_export_and_maps_the_default_name_to_it() {
        let reg = registry(4);
        let scope = Scope::Only("disk0".into());
        let mut n = Negotiator::new(&reg, &scope, SIZES, 1);
        assert!(matches!(n.handle(opt::GO, &hs::encode_info_request("", &[]), &mut Vec::new()), Step::Enter(_)));
        let other = Scope::Only("disk1".into());
        let mut n = Negotiator::new(&reg, &other, SIZES, 1);
        let mut out = Vec::new();
        n.handle(opt::LIST, &[], &mut out);
        assert_eq!(replies(&out).len(), 1, "only the ACK: disk0 is not visible here");
        // Its own export missing (being removed): "shutting down", try again; another name: unknown.
        for (name, reply) in [("disk1", rep::ERR_SHUTDOWN), ("", rep::ERR_SHUTDOWN), ("disk0", rep::ERR_UNKNOWN)] {
            let mut out = Vec::new();
            assert!(matches!(n.handle(opt::GO, &hs::encode_info_request(name, &[]), &mut out), Step::Continue));
            assert_eq!(replies(&out)[0].0.reply, reply, "{name:?}");
        }
    }

    #[test]
    fn a_refused_client_sees_no_export_and_is_told_why_for_each_it_asks_for() {
        let reg = registry(4);
        let scope = Scope::Refused("not from 10.0.0.9".into());
        let mut n = Negotiator::new(&reg, &scope, SIZES, 1);
        let mut out = Vec::new();
        n.handle(opt::LIST, &[], &mut out);
        assert_eq!(replies(&out).len(), 1, "only the ACK");
        for (option, name) in [(opt::GO, "disk0"), (opt::INFO, ""), (opt::GO, "missing")] {
            let mut out = Vec::new();
            assert!(matches!(n.handle(option, &hs::encode_info_request(name, &[]), &mut out), Step::Continue));
            let r = replies(&out);
            assert_eq!((r.len(), r[0].0.reply), (1, rep::ERR_POLICY));
            assert_eq!(r[0].1, b"not from 10.0.0.9");
        }
        let Step::Disconnect(why) = n.handle(opt::EXPORT_NAME, b"disk0", &mut Vec::new()) else { panic!() };
        assert_eq!(why, "not from 10.0.0.9");
    }

    #[test]
    fn export_name_without_such_export_disconnects_and_with_it_enters() {
        let reg = registry(1);
        let scope = Scope::All;
        let mut n = Negotiator::new(&reg, &scope, SIZES, 3);
        assert!(matches!(n.handle(opt::EXPORT_NAME, b"missing", &mut Vec::new()), Step::Disconnect(_)));
        let mut out = Vec::new();
        assert!(matches!(n.handle(opt::EXPORT_NAME, b"disk0", &mut out), Step::Enter(_)));
        assert_eq!(out.len(), 10, "NO_ZEROES was negotiated");
    }

    #[test]
    fn client_flags_with_unknown_bits_are_invalid() {
        assert!(Negotiator::client_flags_valid(3));
        assert!(!Negotiator::client_flags_valid(4));
    }
}
