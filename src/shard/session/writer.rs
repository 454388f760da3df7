//! The writer task: everything queued since the last write goes out in one
//! writev straight from the shared frames, then held envelopes that waited
//! for room follow and the latency stamps are recorded.
use super::super::link::SessionLink;
use super::super::outbound::{FrameBatch, Stamp, StampKind};
use super::super::signal::yield_now;
use super::super::state::Shard;
use monoio::io::AsyncWriteRent;
use monoio::net::tcp::TcpOwnedWriteHalf;
use std::rc::Rc;
use std::time::Instant;

/// Drains the outbound queue: everything queued since the last write goes
/// out in one syscall. Ends after the close frame (or on abort).
pub(super) async fn write_loop(
    mut writer: TcpOwnedWriteHalf,
    link: Rc<SessionLink>,
    shard: Rc<Shard>,
) {
    let mut batch = FrameBatch::default();
    while link.out.wait_ready().await {
        // Let every task already runnable this turn (readers routing more
        // sends) queue its frames first: one write then carries them all.
        yield_now().await;
        link.out.take_now(&mut batch);
        if batch.is_empty() {
            continue; // aborted meanwhile
        }
        // writev straight from the shared frames: no copy in user space.
        let mut result = Ok(());
        loop {
            let (written, returned) = writer.writev(batch).await;
            batch = returned;
            match written {
                Ok(0) => result = Err(()),
                Ok(n) if !batch.advance(n) => continue,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => result = Err(()),
            }
            break;
        }
        if result.is_err() {
            let late = link.abort(batch.unwritten());
            link.shut();
            shard.give_back(&link, late);
            break;
        }
        shard.metrics.socket_write(batch.len());
        // Room freed: envelopes still held for this session's member (a
        // backlog bigger than one outbound bound) come next.
        if let Some((mesh, member)) = link.member_with_held() {
            shard.drain_held_to(&mesh, &member, &link);
        }
        let now = Instant::now();
        let mut histograms = shard.histograms.borrow_mut();
        // The member only when a held or leased envelope went out: cloning
        // its shared entry on every write would bounce its count between
        // cores.
        let mut member = None;
        let leasing = link.is_leasing();
        batch.finish(
            |stamp| record_stamp(&mut histograms, stamp, now),
            leasing,
            |envelope, stored| {
                if let Some((mesh, member)) = member.get_or_insert_with(|| link.member()) {
                    if leasing {
                        shard.lease(&link, mesh, member, envelope, stored);
                    } else {
                        shard.mark_delivered(envelope, member);
                    }
                }
            },
        );
    }
    let _ = writer.shutdown().await;
}

fn record_stamp(histograms: &mut crate::metrics::LocalHistograms, stamp: Stamp, now: Instant) {
    let elapsed = now.duration_since(stamp.sent_at);
    match stamp.kind {
        StampKind::Ack => histograms.record_send_ack(stamp.priority, elapsed),
        StampKind::Push => histograms.record_send_push(stamp.priority, elapsed),
    }
}
