//! The in-process test transport: one thread per rank, rank 0 joined to each other rank by a
//! pair of channels. A rank whose communicator is dropped (its thread ended or panicked) shows
//! up as a closed link, exactly as a dead process does over TCP.

use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::time::Duration;

use super::{Group, Link, LinkError, Msg};

struct ChannelLink {
    tx: Sender<Msg>,
    rx: Receiver<Msg>,
}

impl Link for ChannelLink {
    fn send(&mut self, msg: &Msg) -> Result<(), LinkError> {
        self.tx.send(msg.clone()).map_err(|_| LinkError::Closed)
    }
    fn recv(&mut self, timeout: Duration) -> Result<Msg, LinkError> {
        self.rx.recv_timeout(timeout).map_err(|e| match e {
            RecvTimeoutError::Timeout => LinkError::TimedOut(timeout),
            RecvTimeoutError::Disconnected => LinkError::Closed,
        })
    }
}

pub(super) fn group(world: usize, timeout: Duration) -> Vec<Group> {
    assert!(world >= 1, "a group has at least one rank");
    let (mut root_links, mut others): (Vec<Box<dyn Link>>, Vec<Group>) = (Vec::new(), Vec::new());
    for r in 1..world {
        let (to_r, from_root) = channel();
        let (to_root, from_r) = channel();
        root_links.push(Box::new(ChannelLink { tx: to_r, rx: from_r }));
        others.push(Group::new(r, world, vec![Box::new(ChannelLink { tx: to_root, rx: from_root })], timeout));
    }
    let mut all = vec![Group::new(0, world, root_links, timeout)];
    all.extend(others);
    all
}
