//! Where a connection's replies are read from, and how a read's data is taken out of it.
//!
//! Over a plain byte stream the reader is buffered (a reply header is a few bytes; one syscall
//! each would cost more than the data's copy), and data owned by the caller is one buffer read
//! into. Over a transport that hands out what it received ([`ReceiveBytes`]) the reader is not
//! buffered (a buffer in front would copy the messages it was meant to pass on), and data is
//! the transport's own pieces, in order ([`Client::read_bytes`](super::Client::read_bytes)).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, BufReader, ReadBuf};

use super::ClientError;
use crate::zero_copy::ReceiveBytes;

/// A connection's read half as the reply reader uses it.
pub(super) trait ReplySource: AsyncRead + Unpin + Send + 'static {
    /// Read exactly `len` bytes and append them to `into` as owned pieces.
    fn read_owned<'a>(
        &'a mut self,
        len: usize,
        into: &'a mut Vec<Bytes>,
    ) -> impl Future<Output = std::io::Result<()>> + Send + 'a;
}

impl<R: AsyncRead + Unpin + Send + 'static> ReplySource for BufReader<R> {
    async fn read_owned(&mut self, len: usize, into: &mut Vec<Bytes>) -> std::io::Result<()> {
        let mut buf = vec![0; len];
        self.read_exact(&mut buf).await?;
        into.push(Bytes::from(buf));
        Ok(())
    }
}

/// A [`ReceiveBytes`] transport as a reply source: read as it is, unbuffered.
pub(super) struct Received<R>(pub(super) R);

impl<R: ReceiveBytes> AsyncRead for Received<R> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<R: ReceiveBytes> ReplySource for Received<R> {
    async fn read_owned(&mut self, len: usize, into: &mut Vec<Bytes>) -> std::io::Result<()> {
        let mut left = len;
        while left > 0 {
            let piece = std::future::poll_fn(|cx| Pin::new(&mut self.0).poll_receive(cx, left)).await?;
            if piece.is_empty() {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            if piece.len() > left {
                return Err(std::io::Error::other("the transport handed out more bytes than were asked for"));
            }
            left -= piece.len();
            into.push(piece);
        }
        Ok(())
    }
}

/// A read's pieces, each with its position in the read, put in order: together they must be
/// exactly the `length` bytes asked for (chunks of a structured reply come in any order, and a
/// server whose chunks overlap or leave a gap has broken the protocol).
pub(super) fn in_order(mut pieces: Vec<(usize, Bytes)>, length: usize) -> Result<Vec<Bytes>, ClientError> {
    pieces.sort_by_key(|(start, _)| *start);
    let mut at = 0usize;
    for (start, piece) in &pieces {
        if *start != at {
            return Err(ClientError::Protocol(format!(
                "read reply chunks overlap or leave a gap at byte {at} of {length}"
            )));
        }
        at += piece.len();
    }
    if at != length {
        return Err(ClientError::Protocol(format!("read reply covered {at} of {length} bytes")));
    }
    Ok(pieces.into_iter().map(|(_, piece)| piece).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(start: usize, len: usize) -> (usize, Bytes) {
        (start, Bytes::from(vec![start as u8; len]))
    }

    #[test]
    fn pieces_come_back_in_order_only_when_they_tile_the_read() {
        let got = in_order(vec![piece(4, 4), piece(0, 4), piece(8, 2)], 10).expect("tiles");
        assert_eq!(got.iter().map(Bytes::len).collect::<Vec<_>>(), [4, 4, 2]);
        assert_eq!(got.first().and_then(|b| b.first()), Some(&0));
        assert!(in_order(vec![piece(0, 4), piece(2, 4)], 6).is_err(), "overlap");
        assert!(in_order(vec![piece(0, 4), piece(6, 4)], 10).is_err(), "gap");
        assert!(in_order(vec![piece(0, 4)], 10).is_err(), "short");
        assert!(in_order(Vec::new(), 0).expect("nothing asked").is_empty());
    }
}
