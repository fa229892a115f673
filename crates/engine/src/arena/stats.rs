//! The arena's statistics beside the judge: win rates of both sides with Wilson score
//! intervals, and the agreement of a judge with the human votes (percent agreement with
//! its Wilson interval, Cohen's kappa with the large-sample interval of Fleiss, Cohen and
//! Everitt, 1969).

use attune_protocol::{Agreement, Estimate, WinRates};

use super::{tally, wilson, Z95};

/// The vote categories, in the order of the agreement table.
pub(crate) const CATEGORIES: [&str; 4] = ["a", "b", "tie", "both_bad"];

/// The category index of a stored vote.
pub(crate) fn category(vote: &str) -> Option<usize> {
    CATEGORIES.iter().position(|c| *c == vote)
}

/// How the kappa interval is computed, for the results.
pub(crate) const KAPPA_METHOD: &str = "Cohen's kappa over a / b / tie / both bad; 95% \
     interval kappa ± 1.96 × the large-sample standard error of Fleiss, Cohen and Everitt \
     (1969), clipped to [-1, 1]; percent agreement with a 95% Wilson score interval";

/// Win rates of both sides: a tie is half a win for each, "both bad" is left out; B's
/// rate is 1 − A's and its interval the mirror of A's Wilson interval.
pub(crate) fn win_rates(a_wins: u64, b_wins: u64, ties: u64, both_bad: u64) -> WinRates {
    let t = tally(a_wins, b_wins, ties, both_bad);
    let (a, b) = match (t.a_win_rate, t.ci_low, t.ci_high) {
        (Some(p), Some(lo), Some(hi)) => (
            Some(Estimate {
                value: p,
                low: lo,
                high: hi,
            }),
            Some(Estimate {
                value: 1.0 - p,
                low: 1.0 - hi,
                high: 1.0 - lo,
            }),
        ),
        _ => (None, None),
    };
    WinRates { tally: t, a, b }
}

/// Win rates from stored votes ("a", "b", "tie", "both_bad").
pub(crate) fn win_rates_of<'a>(votes: impl IntoIterator<Item = &'a str>) -> WinRates {
    let mut c = [0u64; 4];
    for v in votes {
        if let Some(i) = category(v) {
            c[i] += 1;
        }
    }
    win_rates(c[0], c[1], c[2], c[3])
}

/// Cohen's kappa of a square table of counts (rows one rater, columns the other) and its
/// large-sample standard error (Fleiss, Cohen & Everitt 1969, as SAS PROC FREQ states it):
///
/// Var = (A + B − C) / ((1 − Pe)² n), with
/// A = Σᵢ pᵢᵢ [1 − (pᵢ. + p.ᵢ)(1 − κ)]², B = (1 − κ)² Σ_{i≠j} pᵢⱼ (p.ᵢ + pⱼ.)²,
/// C = [κ − Pe (1 − κ)]².
///
/// None when the table is empty or chance agreement is 1 (kappa is undefined).
pub(crate) fn cohen_kappa<const K: usize>(table: &[[u64; K]; K]) -> Option<(f64, f64)> {
    let n: u64 = table.iter().flatten().sum();
    if n == 0 {
        return None;
    }
    let nf = n as f64;
    let p = |i: usize, j: usize| table[i][j] as f64 / nf;
    let row: Vec<f64> = (0..K).map(|i| (0..K).map(|j| p(i, j)).sum()).collect();
    let col: Vec<f64> = (0..K).map(|j| (0..K).map(|i| p(i, j)).sum()).collect();
    let po: f64 = (0..K).map(|i| p(i, i)).sum();
    let pe: f64 = (0..K).map(|i| row[i] * col[i]).sum();
    if 1.0 - pe < 1e-12 {
        return None;
    }
    let kappa = (po - pe) / (1.0 - pe);
    let a: f64 = (0..K)
        .map(|i| p(i, i) * (1.0 - (row[i] + col[i]) * (1.0 - kappa)).powi(2))
        .sum();
    let off_diagonal: f64 = (0..K)
        .flat_map(|i| (0..K).map(move |j| (i, j)))
        .filter(|(i, j)| i != j)
        .map(|(i, j)| p(i, j) * (col[i] + row[j]).powi(2))
        .sum();
    let b = (1.0 - kappa).powi(2) * off_diagonal;
    let c = (kappa - pe * (1.0 - kappa)).powi(2);
    let var = ((a + b - c) / ((1.0 - pe).powi(2) * nf)).max(0.0);
    Some((kappa, var.sqrt()))
}

/// Agreement between human and judge votes: `pairs` are (human, judge) category indices
/// of the prompts both voted on.
pub(crate) fn agreement(pairs: &[(usize, usize)]) -> Agreement {
    let mut table = [[0u64; 4]; 4];
    for &(h, j) in pairs {
        if h < 4 && j < 4 {
            table[h][j] += 1;
        }
    }
    let n: u64 = table.iter().flatten().sum();
    let agreed: u64 = (0..4).map(|i| table[i][i]).sum();
    let percent = (n > 0).then(|| {
        let p = agreed as f64 / n as f64;
        let (low, high) = wilson(p, n as f64, Z95);
        Estimate {
            value: p,
            low,
            high,
        }
    });
    let k = cohen_kappa(&table);
    Agreement {
        n,
        agreed,
        percent,
        kappa: k.map(|(kappa, se)| Estimate {
            value: kappa,
            low: (kappa - Z95 * se).max(-1.0),
            high: (kappa + Z95 * se).min(1.0),
        }),
        kappa_se: k.map(|(_, se)| se),
        method: KAPPA_METHOD.to_string(),
        table,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn near(x: f64, want: f64, tol: f64) {
        assert!((x - want).abs() < tol, "{x} vs {want}");
    }

    #[test]
    fn kappa_matches_the_textbook_two_by_two_example() {
        // Wikipedia's "Cohen's kappa" example: 50 proposals, both yes 20, A yes / B no 5,
        // A no / B yes 10, both no 15. Po = 0.7, Pe = 0.5*0.6 + 0.5*0.4 = 0.5, kappa = 0.4.
        // By hand (module docs): A = .4(1-1.1*.6)^2 + .3(1-.9*.6)^2 = 0.10972,
        // B = .36(.1*1.1^2 + .2*.9^2) = 0.10188, C = (.4-.5*.6)^2 = 0.01,
        // Var = 0.2016 / (.25 * 50) = 0.016128, SE = 0.126996.
        let (k, se) = cohen_kappa(&[[20, 5], [10, 15]]).expect("defined");
        near(k, 0.4, 1e-12);
        near(se, 0.016128f64.sqrt(), 1e-9);
        near(se, 0.126996, 1e-6);
        // statsmodels 0.15 (`statsmodels.stats.inter_rater.cohens_kappa`) agrees:
        // std_kappa 0.12699606, interval [0.151092, 0.648908].
        // The same counts in the arena's 4x4 table (only a and b used) give the same.
        let mut pairs = Vec::new();
        for (h, j, n) in [(0, 0, 20), (0, 1, 5), (1, 0, 10), (1, 1, 15)] {
            pairs.extend(std::iter::repeat_n((h, j), n));
        }
        let ag = agreement(&pairs);
        assert_eq!((ag.n, ag.agreed), (50, 35));
        let kappa = ag.kappa.expect("kappa");
        near(kappa.value, 0.4, 1e-12);
        // 0.4 ± 1.959964 * 0.126996 = [0.151089, 0.648911].
        near(kappa.low, 0.151089, 1e-5);
        near(kappa.high, 0.648911, 1e-5);
        // 35 of 50 agree: Wilson 95% for 0.7 over 50 = [0.5625, 0.8090].
        let pc = ag.percent.expect("percent");
        near(pc.value, 0.7, 1e-12);
        near(pc.low, 0.5625, 1e-4);
        near(pc.high, 0.8090, 1e-4);
    }

    #[test]
    fn kappa_of_a_three_category_table_by_hand() {
        // Rows human, columns judge over a, b, tie; n = 20:
        //   [[6, 1, 1], [1, 5, 0], [1, 1, 4]]
        // Po = 15/20 = 0.75; rows (.4, .3, .3), columns (.4, .35, .25);
        // Pe = .16 + .105 + .075 = 0.34; kappa = .41 / .66 = 0.621212.
        let (k, se) = cohen_kappa(&[[6, 1, 1], [1, 5, 0], [1, 1, 4]]).expect("defined");
        near(k, 0.41 / 0.66, 1e-12);
        // With 1 - kappa = 0.378788:
        // A = .3(1-.8*.378788)^2 + .25(1-.65*.378788)^2 + .2(1-.55*.378788)^2
        //   = .145730 + .142049 + .125347 = 0.413126
        // B = .378788^2 * (.05*(.4+.3)^2 + .05*(.4+.3)^2 + .05*(.35+.4)^2 + 0
        //     + .05*(.25+.4)^2 + .05*(.25+.3)^2) = 0.143480 * 0.113375 = 0.016267
        // C = (.621212 - .34*.378788)^2 = 0.492424^2 = 0.242481
        // Var = (0.413126 + 0.016267 - 0.242481) / (.66^2 * 20) = 0.186912 / 8.712
        //     = 0.021455; SE = 0.146474
        near(se, 0.146474, 2e-6);
        // statsmodels 0.15 `cohens_kappa`: std_kappa 0.14647360.
    }

    #[test]
    fn kappa_is_undefined_without_variation_and_perfect_agreement_is_one() {
        assert_eq!(cohen_kappa(&[[0u64; 2]; 2]), None);
        // Both always "a": chance agreement is 1.
        assert_eq!(cohen_kappa(&[[7, 0], [0, 0]]), None);
        let ag = agreement(&[(0, 0); 7]);
        assert_eq!(ag.kappa, None);
        near(ag.percent.expect("percent").value, 1.0, 1e-12);
        let (k, se) = cohen_kappa(&[[5, 0], [0, 5]]).expect("defined");
        near(k, 1.0, 1e-12);
        near(se, 0.0, 1e-12);
        // Complete disagreement on a balanced table: kappa = -1.
        let (k, _) = cohen_kappa(&[[0, 5], [5, 0]]).expect("defined");
        near(k, -1.0, 1e-12);
        let empty = agreement(&[]);
        assert_eq!((empty.n, empty.percent, empty.kappa), (0, None, None));
    }

    #[test]
    fn win_rates_mirror_each_side() {
        // 7 A wins, 3 B wins, 2 ties, 1 both bad: A = (7 + 1) / 12 = 0.6667;
        // Wilson over n = 12 -> [0.3906, 0.8619]; B = 0.3333 in [0.1381, 0.6094].
        let w = win_rates(7, 3, 2, 1);
        let (a, b) = (w.a.expect("a"), w.b.expect("b"));
        near(a.value, 8.0 / 12.0, 1e-12);
        near(a.low, 0.3906, 1e-4);
        near(a.high, 0.8619, 1e-4);
        near(b.value, 4.0 / 12.0, 1e-12);
        near(b.low, 1.0 - 0.8619, 1e-4);
        near(b.high, 1.0 - 0.3906, 1e-4);
        let w = win_rates_of(["a", "b", "both_bad", "nonsense"]);
        assert_eq!(
            (w.tally.a_wins, w.tally.b_wins, w.tally.both_bad),
            (1, 1, 1)
        );
        assert!(win_rates(0, 0, 0, 2).a.is_none());
    }
}
