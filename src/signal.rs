//! Where the signal tokens (`[IMG0]..`, `[VID0]..`, `[AUD0]..`) sit in an LLM's output.

use crate::error::{Error, Result};
use crate::tensor::try_filled;

/// Validated positions of `n` signal tokens in each of `B` sequences of length `T`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignalPositions {
    batch: usize,
    seq_len: usize,
    count: usize,
    /// `positions[b * count + i]` is the position of token `i` in sequence `b`.
    positions: Vec<usize>,
}

impl SignalPositions {
    /// Find the signal tokens in `token_ids` (`[batch, seq_len]`, row-major).
    ///
    /// `signal_ids` lists the ids in the order they must appear (`[IMG0]..[IMG{n-1}]`,
    /// or, for the v1.5 layout, the signal tokens with their separators). Position
    /// `p_i` is the first occurrence of `signal_ids[i]` after `p_{i-1}`. A sequence
    /// that lacks one of them, or has them out of order, is an error naming the
    /// sequence and the token.
    ///
    /// ```
    /// use output_projector::signal::SignalPositions;
    ///
    /// # fn main() -> output_projector::Result<()> {
    /// // [AUD0]..[AUD2] as ids 70..=72 (made up), in two answers of 6 tokens.
    /// let aud = [70, 71, 72];
    /// let tokens = [1, 70, 71, 72, 2, 0, /* */ 3, 4, 70, 5, 71, 72];
    /// let found = SignalPositions::find(&tokens, 2, 6, &aud)?;
    /// assert_eq!(found.positions(), &[1, 2, 3, 2, 4, 5]);
    ///
    /// // An answer without [AUD2] is an error naming it, not a shorter gather.
    /// let short = [1, 70, 71, 2, 0, 0];
    /// let e = SignalPositions::find(&short, 1, 6, &aud).unwrap_err();
    /// assert!(e.to_string().starts_with("sequence 0"), "{e}");
    /// # Ok(())
    /// # }
    /// ```
    pub fn find(
        token_ids: &[i64],
        batch: usize,
        seq_len: usize,
        signal_ids: &[i64],
    ) -> Result<Self> {
        let total = batch
            .checked_mul(seq_len)
            .ok_or_else(|| Error::Overflow(format!("token ids [{batch}, {seq_len}]")))?;
        if batch == 0 {
            return Err(Error::invalid("token ids: batch is 0"));
        }
        if token_ids.len() != total {
            return Err(Error::Shape {
                key: "token_ids".into(),
                expected: vec![batch, seq_len],
                found: vec![token_ids.len()],
            });
        }
        if signal_ids.is_empty() {
            return Err(Error::invalid("no signal token ids given"));
        }
        if seq_len == 0 {
            return Err(Error::SignalTokens {
                batch: 0,
                reason: "the sequence is empty".into(),
            });
        }
        let count = signal_ids.len();
        if count > seq_len {
            return Err(Error::invalid(format!(
                "{count} signal token ids cannot all be found in sequences of {seq_len} tokens"
            )));
        }
        // count <= seq_len, so this is at most the token count, which exists.
        let mut positions = Vec::with_capacity(batch * count);
        for (b, seq) in token_ids.chunks_exact(seq_len).enumerate().take(batch) {
            let mut from = 0usize;
            for (i, &id) in signal_ids.iter().enumerate() {
                match seq[from..].iter().position(|&t| t == id) {
                    Some(off) => {
                        positions.push(from + off);
                        from += off + 1;
                    }
                    None => {
                        let reason = if seq[..from].contains(&id) {
                            format!(
                                "signal token {i} (id {id}) appears only before signal token {} (id {}): out of order",
                                i - 1,
                                signal_ids[i - 1]
                            )
                        } else if i == 0 {
                            format!("signal token 0 (id {id}) is missing")
                        } else {
                            format!(
                                "signal token {i} (id {id}) is missing after position {}",
                                from - 1
                            )
                        };
                        return Err(Error::SignalTokens { batch: b, reason });
                    }
                }
            }
        }
        Ok(SignalPositions {
            batch,
            seq_len,
            count,
            positions,
        })
    }

    /// Positions `0..n` in every sequence: the identity gather, used to add
    /// `hidden + embeds` when the caller already extracted the signal rows.
    pub fn all(batch: usize, n: usize) -> Result<Self> {
        let total = batch
            .checked_mul(n)
            .ok_or_else(|| Error::Overflow(format!("signal positions [{batch}, {n}]")))?;
        if batch == 0 || n == 0 {
            return Err(Error::invalid(format!(
                "signal positions [{batch}, {n}]: batch and count must be at least 1"
            )));
        }
        let mut positions = try_filled(total, 0, "signal positions")?;
        for (i, p) in positions.iter_mut().enumerate() {
            *p = i % n;
        }
        Ok(SignalPositions {
            batch,
            seq_len: n,
            count: n,
            positions,
        })
    }

    /// Sequences, `B`.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Tokens per sequence, `T`: the `hidden` rows a gather reads from
    /// (`n` for [`all`](Self::all)).
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Signal tokens per sequence.
    pub fn count(&self) -> usize {
        self.count
    }

    /// `[batch * count]` positions, row-major.
    pub fn positions(&self) -> &[usize] {
        &self.positions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_contiguous_and_separated_tokens() -> Result<()> {
        let ids = [1, 9, 10, 11, 2, 5, 9, 7, 10, 7, 11];
        let p = SignalPositions::find(&ids[..5], 1, 5, &[9, 10, 11])?;
        assert_eq!(p.positions(), &[1, 2, 3]);
        let p = SignalPositions::find(&ids[5..], 1, 6, &[9, 7, 10, 7, 11])?;
        assert_eq!(p.positions(), &[1, 2, 3, 4, 5]);
        Ok(())
    }

    #[test]
    fn missing_and_out_of_order_are_errors() {
        let e = SignalPositions::find(&[1, 2, 3, 4], 2, 2, &[3]).err();
        assert!(e.is_some_and(|e| e.to_string().contains("sequence 0")));
        let e = SignalPositions::find(&[5, 4, 0], 1, 3, &[4, 5]).err();
        assert!(e.is_some_and(|e| e.to_string().contains("out of order")));
        assert!(SignalPositions::find(&[], 1, 0, &[4]).is_err());
        assert!(SignalPositions::find(&[1, 2], 0, 2, &[1]).is_err());
        assert!(SignalPositions::find(&[1, 2], 1, 2, &[]).is_err());
        assert!(SignalPositions::find(&[1, 2], usize::MAX, 2, &[1]).is_err());
    }

    #[test]
    fn sizes_that_cannot_be_met_are_errors_before_any_allocation() {
        // A million sequences of one token and a million ids: the positions
        // would be 8 TB; more ids than tokens cannot be found anyway.
        let tokens = vec![0i64; 1_000_000];
        let ids = vec![7i64; 1_000_000];
        let e = SignalPositions::find(&tokens, 1_000_000, 1, &ids).err();
        assert!(
            e.as_ref()
                .is_some_and(|e| e.to_string().contains("sequences of 1 tokens")),
            "{e:?}"
        );
        let e = SignalPositions::all(1 << 40, 1 << 20).err();
        assert!(matches!(e, Some(Error::OutOfMemory(_))), "{e:?}");
    }
}
