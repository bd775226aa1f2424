//! The prompt cache: each slot of the batch loop keeps the KV cells of its last
//! prompt, and the next request that starts with the same tokens takes that slot
//! and computes only the rest.
//!
//! Reuse is exact: a greedy reply is the same token for token as without the cache.
//! That takes two rules, both from how llama.cpp's CPU attention computes a row.
//! - Only prompt rows are kept, never generated ones. A generated token's row was
//!   computed alone (one query row), a prompt row of the same token in a batch, and
//!   the two attention kernels round differently.
//! - A kept row must have been computed on the attention path a fresh prompt would
//!   take for it. ggml's flash attention tiles a stream's query rows when the ubatch
//!   holds at least [`ATTENTION_TILE`] of them, and runs them one by one below that.
//!   Within one path a row's result does not depend on its neighbours. So each row
//!   remembers its path, and the cut between kept and computed rows is placed where
//!   the computed tail falls into ubatches of the same paths as a fresh prompt's.
//!
//! The rules cost little: the tail is at least one tile (64 rows) long when the new
//! tokens are fewer, and the previous reply is computed again as part of the new
//! prompt. A slot holds at most its context, in cells it owns anyway (one KV stream
//! per slot), so the cache takes no memory beyond the slots'; a request takes the
//! free slot that lets it reuse the most, else the least recently used one.

/// Query rows from which ggml's CPU flash attention takes its tiled path
/// (`GGML_FA_TILE_Q` in the llama.cpp this crate builds).
pub const ATTENTION_TILE: usize = 64;

/// What one slot's cells hold from the last request it ran.
#[derive(Debug, Clone)]
struct Held<T> {
    /// The prompt rows, from position 0.
    tokens: Vec<T>,
    /// Per row: computed in a ubatch of at least [`ATTENTION_TILE`] rows.
    tiled: Vec<bool>,
    /// When the slot last ran a request; 0 = never.
    used: u64,
}

/// The slots of one context and what each holds.
#[derive(Debug)]
pub struct Slots<T> {
    held: Vec<Held<T>>,
    busy: Vec<bool>,
    clock: u64,
    /// Rows in one ubatch (the context's `n_ubatch`).
    ubatch: usize,
}

impl<T: PartialEq + Clone> Slots<T> {
    pub fn new(count: u32, ubatch: usize) -> Slots<T> {
        let held = Held {
            tokens: Vec::new(),
            tiled: Vec::new(),
            used: 0,
        };
        Slots {
            held: vec![held; count as usize],
            busy: vec![false; count as usize],
            clock: 0,
            ubatch: ubatch.max(1),
        }
    }

    pub fn any_free(&self) -> bool {
        self.busy.iter().any(|b| !b)
    }

    /// Takes a free slot for `prompt`: the one whose rows it can reuse the most of
    /// (none unless `reuse`), else the least recently used. Returns the slot and how
    /// many leading rows of its cells to keep; the caller removes the rest.
    pub fn take(&mut self, prompt: &[T], reuse: bool) -> Option<(u32, usize)> {
        let mut best: Option<(usize, usize, u64)> = None;
        for (slot, held) in self.held.iter().enumerate() {
            if self.busy[slot] {
                continue;
            }
            let kept = if reuse {
                reusable(&held.tokens, &held.tiled, prompt, self.ubatch)
            } else {
                0
            };
            let better = match best {
                None => true,
                Some((_, k, used)) => kept > k || (kept == k && held.used < used),
            };
            if better {
                best = Some((slot, kept, held.used));
            }
        }
        let (slot, kept, _) = best?;
        self.busy[slot] = true;
        self.clock += 1;
        let held = &mut self.held[slot];
        held.used = self.clock;
        held.tokens.truncate(kept);
        held.tiled.truncate(kept);
        Some((u32::try_from(slot).ok()?, kept))
    }

    /// The attention paths of the rows `slot` holds (all of them right after
    /// [`Slots::take`]: the kept ones).
    pub fn held_paths(&self, slot: u32) -> &[bool] {
        self.held.get(slot as usize).map_or(&[], |h| &h.tiled)
    }

    /// Gives `slot` back, holding the prompt rows `tokens` computed on the paths in
    /// `tiled` (as long as each other). An empty `tokens` says the cells are gone.
    pub fn release(&mut self, slot: u32, tokens: Vec<T>, tiled: Vec<bool>) {
        let Some(held) = self.held.get_mut(slot as usize) else {
            return;
        };
        let rows = tokens.len().min(tiled.len());
        held.tokens = tokens;
        held.tiled = tiled;
        held.tokens.truncate(rows);
        held.tiled.truncate(rows);
        self.busy[slot as usize] = false;
    }
}

/// Whether row `row` of a `len`-row prompt whose rows from `start` on are computed
/// lands in a tiled ubatch. The batch loop ends a prompt's ubatches on multiples of
/// `ubatch` (see [`chunk_end`]): from row 0 that is a fresh prompt's partition, and
/// from `start` only the first ubatch differs, being shorter.
fn tiled_from(start: usize, row: usize, len: usize, ubatch: usize) -> bool {
    let first_end = chunk_end(start, ubatch);
    let chunk_start = if row < first_end {
        start
    } else {
        row / ubatch * ubatch
    };
    chunk_end(chunk_start, ubatch).min(len) - chunk_start >= ATTENTION_TILE
}

/// Where the prompt ubatch starting at row `fed` ends: the next multiple of
/// `ubatch`, so a prompt resumed from the cache is cut where a fresh one is.
pub fn chunk_end(fed: usize, ubatch: usize) -> usize {
    (fed / ubatch + 1) * ubatch
}

/// How many leading rows of a slot holding `held` (computed on the paths `tiled`)
/// `prompt` can keep so that every row ends as a fresh prompt would compute it. At
/// least the last prompt row is always computed: its logits start the reply.
pub fn reusable<T: PartialEq>(held: &[T], tiled: &[bool], prompt: &[T], ubatch: usize) -> usize {
    let ubatch = ubatch.max(1);
    let len = prompt.len();
    let common = held
        .iter()
        .zip(tiled)
        .zip(prompt)
        .take_while(|((h, _), p)| h == p)
        .count()
        .min(len.saturating_sub(1));
    let exact = |kept: usize| {
        (0..kept).all(|row| tiled[row] == tiled_from(0, row, len, ubatch))
            && (kept..len)
                .all(|row| tiled_from(kept, row, len, ubatch) == tiled_from(0, row, len, ubatch))
    };
    // The longest prefix first; then a first ubatch stretched back to one whole
    // tile, within the fresh ubatch it falls in; then that ubatch's start, from where
    // the tail is cut exactly as a fresh prompt is.
    let aligned = common / ubatch * ubatch;
    let stretched = chunk_end(common, ubatch)
        .min(len)
        .saturating_sub(ATTENTION_TILE)
        .clamp(aligned, common.max(aligned));
    [common, stretched.min(common), aligned]
        .into_iter()
        .filter(|&kept| exact(kept))
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The paths a prompt computed from row 0 took, as the batch loop records them.
    fn fresh(len: usize, ubatch: usize) -> Vec<bool> {
        (0..len).map(|r| tiled_from(0, r, len, ubatch)).collect()
    }

    fn tokens(len: usize) -> Vec<u32> {
        (0..len as u32).collect()
    }

    #[test]
    fn a_longer_prompt_keeps_the_held_rows_when_the_tail_fills_a_tile() {
        let held = tokens(300);
        let mut prompt = tokens(300);
        prompt.extend(1000..1100);
        assert_eq!(reusable(&held, &fresh(300, 512), &prompt, 512), 300);
    }

    #[test]
    fn a_short_tail_is_stretched_back_to_one_tile() {
        let held = tokens(300);
        let mut prompt = tokens(300);
        prompt.extend(1000..1010);
        // 310 rows fresh are one tiled ubatch; the tail must be 64 rows to be tiled.
        assert_eq!(reusable(&held, &fresh(300, 512), &prompt, 512), 310 - 64);
    }

    #[test]
    fn rows_held_from_a_short_prompt_are_not_reused_by_a_long_one() {
        // 40 rows were one ubatch below the tile: the per-row path. Fresh, the
        // 200-row prompt tiles them.
        let held = tokens(40);
        let prompt = tokens(200);
        assert_eq!(reusable(&held, &fresh(40, 512), &prompt, 512), 0);
    }

    #[test]
    fn rows_of_a_short_last_ubatch_are_reused_only_where_a_fresh_prompt_is_as_short() {
        // 1030 rows were 512 + 512 + 6: the last 6 took the per-row path.
        let held = tokens(1030);
        let held_tiled = fresh(1030, 512);
        // Fresh, 1040 rows are 512 + 512 + 16: rows 1024.. are per-row there too.
        assert_eq!(reusable(&held, &held_tiled, &tokens(1040), 512), 1030);
        // Fresh, 1100 rows end in a tiled ubatch of 76: the cut goes back to 1024,
        // and the tail is computed in that same ubatch.
        let kept = reusable(&held, &held_tiled, &tokens(1100), 512);
        assert_eq!(kept, 1024);
        let tail: Vec<bool> = (kept..1100)
            .map(|r| tiled_from(kept, r, 1100, 512))
            .collect();
        assert_eq!(tail, fresh(1100, 512)[kept..]);
    }

    #[test]
    fn a_turn_past_one_ubatch_keeps_all_of_the_last_prompt() {
        // 911 rows were 512 + 399, both tiled. Fresh, 1058 rows are 512 + 512 + 34;
        // resumed at 911 they are cut 911..1024 (113 rows, tiled) and 1024..1058
        // (34, per-row): the same paths.
        let held = tokens(911);
        assert_eq!(reusable(&held, &fresh(911, 512), &tokens(1058), 512), 911);
    }

    #[test]
    fn a_different_first_token_reuses_nothing_and_the_last_row_is_always_computed() {
        let held = tokens(300);
        let mut other = tokens(300);
        other[0] = 9999;
        assert_eq!(reusable(&held, &fresh(300, 512), &other, 512), 0);
        // The same prompt again: small ubatches make every row per-row, so any cut
        // is exact, but the last row is computed.
        assert_eq!(reusable(&held, &fresh(300, 32), &held, 32), 299);
    }

    #[test]
    fn a_request_takes_the_slot_it_shares_most_with_else_the_least_recently_used() {
        let mut slots: Slots<u32> = Slots::new(3, 512);
        let (a, kept) = slots.take(&tokens(200), true).unwrap();
        assert_eq!(kept, 0);
        slots.release(a, tokens(200), fresh(200, 512));
        let (b, _) = slots.take(&[7, 7, 7], true).unwrap();
        slots.release(b, vec![7, 7, 7], fresh(3, 512));
        let mut longer = tokens(200);
        longer.extend(500..600);
        assert_eq!(slots.take(&longer, true), Some((a, 200)));
        // Nothing shared: the slot never used goes first, not `b`'s.
        let (c, kept) = slots.take(&[1, 2], true).unwrap();
        assert_eq!(kept, 0);
        assert!(c != a && c != b);
        slots.take(&[1], true).unwrap();
        assert!(!slots.any_free());
        assert_eq!(slots.take(&[1], true), None);
    }

    #[test]
    fn without_reuse_a_request_gets_the_least_recently_used_slot_and_keeps_nothing() {
        let mut slots: Slots<u32> = Slots::new(2, 512);
        let (a, _) = slots.take(&tokens(100), true).unwrap();
        slots.release(a, tokens(100), fresh(100, 512));
        let (b, kept) = slots.take(&tokens(150), false).unwrap();
        assert_eq!((b == a, kept), (false, 0));
    }
}
