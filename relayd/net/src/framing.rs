//! Length-prefixed frames on QUIC streams: a big-endian `u32` length, then
//! the frame. Used by the client, peer and control-plane protocols.

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream failed or ended inside a frame.
    #[error("stream: {0}")]
    Read(#[from] quinn::ReadExactError),
    /// The announced length is above the limit.
    #[error("frame of {0} bytes is above the limit")]
    TooLarge(usize),
    /// The announced length is too short for any frame.
    #[error("frame of {0} bytes is too short")]
    TooShort(usize),
}

/// Reads one frame; `Ok(None)` on a clean end of stream between frames.
pub async fn read_frame(
    recv: &mut quinn::RecvStream,
    max_len: usize,
) -> Result<Option<Bytes>, FrameError> {
    let mut prefix = [0u8; 4];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(prefix) as usize;
    if len > max_len {
        return Err(FrameError::TooLarge(len));
    }
    if len < 2 {
        return Err(FrameError::TooShort(len));
    }
    let mut buf = BytesMut::zeroed(len);
    recv.read_exact(&mut buf).await?;
    Ok(Some(buf.freeze()))
}

/// Spawns a task writing queued frames to `send` in order; it ends when
/// the queue's senders are gone or the stream fails. Frames must carry
/// their length prefix already.
pub fn spawn_writer(mut send: quinn::SendStream, capacity: usize) -> mpsc::Sender<Bytes> {
    let (tx, mut rx) = mpsc::channel::<Bytes>(capacity);
    tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            if send.write_all(&frame).await.is_err() {
                break;
            }
        }
        let _ = send.finish();
    });
    tx
}
