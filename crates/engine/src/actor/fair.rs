//! A bounded queue that serves its clients in turn: each client has its own FIFO, and
//! the next item comes from the client after the one served last (round robin in order
//! of arrival). One client sending many requests cannot starve another that sends one.

use std::collections::VecDeque;

/// Items waiting, per client, with a bound on the total.
#[derive(Debug)]
pub(crate) struct FairQueue<T> {
    /// Clients with waiting items, in serving order; the front is served next.
    clients: VecDeque<(String, VecDeque<T>)>,
    len: usize,
    limit: usize,
}

impl<T> FairQueue<T> {
    pub fn new(limit: usize) -> Self {
        FairQueue {
            clients: VecDeque::new(),
            len: 0,
            limit,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Adds `item` for `client`; gives it back when the queue is full. On success,
    /// returns how many items will be served before it.
    pub fn push(&mut self, client: &str, item: T) -> Result<usize, T> {
        if self.len >= self.limit {
            return Err(item);
        }
        self.len += 1;
        let i = match self.clients.iter().position(|(c, _)| c == client) {
            Some(i) => i,
            None => {
                self.clients
                    .push_back((client.to_string(), VecDeque::new()));
                self.clients.len() - 1
            }
        };
        self.clients[i].1.push_back(item);
        // The new item is this client's k-th; in turn, each client ahead in line is
        // served up to k items before it, each client behind up to k - 1.
        let k = self.clients[i].1.len();
        let ahead = self
            .clients
            .iter()
            .enumerate()
            .map(|(j, (_, q))| match j.cmp(&i) {
                std::cmp::Ordering::Less => q.len().min(k),
                std::cmp::Ordering::Equal => k - 1,
                std::cmp::Ordering::Greater => q.len().min(k - 1),
            })
            .sum();
        Ok(ahead)
    }

    /// The next item and its client: the front client's oldest item; that client then
    /// goes to the back of the line if it still has items.
    pub fn pop(&mut self) -> Option<(String, T)> {
        let (client, mut items) = self.clients.pop_front()?;
        let item = items.pop_front()?;
        self.len -= 1;
        if !items.is_empty() {
            self.clients.push_back((client.clone(), items));
        }
        Some((client, item))
    }

    /// Removes and returns every waiting item for which `f` holds.
    pub fn remove_where(&mut self, mut f: impl FnMut(&T) -> bool) -> Vec<T> {
        let mut out = Vec::new();
        for (_, items) in self.clients.iter_mut() {
            let mut keep = VecDeque::with_capacity(items.len());
            while let Some(item) = items.pop_front() {
                if f(&item) {
                    out.push(item);
                } else {
                    keep.push_back(item);
                }
            }
            *items = keep;
        }
        self.clients.retain(|(_, q)| !q.is_empty());
        self.len -= out.len();
        out
    }

    /// Every waiting item, in no particular order (the queue is left empty).
    pub fn drain(&mut self) -> Vec<T> {
        self.remove_where(|_| true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(q: &mut FairQueue<&'static str>) -> Vec<&'static str> {
        std::iter::from_fn(|| q.pop().map(|(_, x)| x)).collect()
    }

    #[test]
    fn clients_are_served_in_turn() {
        let mut q = FairQueue::new(10);
        for x in ["a1", "a2", "a3"] {
            q.push("a", x).expect("room");
        }
        q.push("b", "b1").expect("room");
        q.push("c", "c1").expect("room");
        q.push("b", "b2").expect("room");
        assert_eq!(q.len(), 6);
        assert_eq!(order(&mut q), ["a1", "b1", "c1", "a2", "b2", "a3"]);
        assert_eq!(q.len(), 0);
        assert!(q.pop().is_none());
    }

    #[test]
    fn the_bound_refuses_and_gives_the_item_back() {
        let mut q = FairQueue::new(2);
        q.push("a", 1).expect("room");
        q.push("b", 2).expect("room");
        assert_eq!(q.push("c", 3), Err(3));
        assert_eq!(q.pop(), Some(("a".to_string(), 1)));
        assert_eq!(q.push("c", 3), Ok(1));
    }

    #[test]
    fn positions_count_what_is_served_first() {
        let mut q = FairQueue::new(10);
        assert_eq!(q.push("a", "a1"), Ok(0));
        assert_eq!(q.push("a", "a2"), Ok(1));
        assert_eq!(q.push("a", "a3"), Ok(2));
        // b's first item is served after a1 only.
        assert_eq!(q.push("b", "b1"), Ok(1));
        // b's second: after a1, b1, a2.
        assert_eq!(q.push("b", "b2"), Ok(3));
        assert_eq!(order(&mut q), ["a1", "b1", "a2", "b2", "a3"]);
    }

    #[test]
    fn removal_keeps_the_rest_in_order() {
        let mut q = FairQueue::new(10);
        for (c, x) in [("a", 1), ("a", 2), ("b", 3), ("a", 4), ("b", 5)] {
            q.push(c, x).expect("room");
        }
        assert_eq!(q.remove_where(|x| x % 2 == 0), vec![2, 4]);
        assert_eq!(q.len(), 3);
        let rest: Vec<i32> = std::iter::from_fn(|| q.pop().map(|(_, x)| x)).collect();
        assert_eq!(rest, [1, 3, 5]);
        q.push("a", 7).expect("room");
        assert_eq!(q.drain(), vec![7]);
        assert_eq!(q.len(), 0);
    }
}
