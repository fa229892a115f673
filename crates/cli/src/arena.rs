//! `attune arena ...`: blind A/B arenas from the command line, and the judge beside the
//! human voter (issue 17): create, list, show a prompt (sides hidden), vote, let a judge
//! vote (`judge`), the results (win rates, agreement, Cohen's kappa, with intervals) and
//! the rubric.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use attune_engine::{Actor, CancelToken, Engine, MAX_JUDGE_TOKENS};
use attune_protocol::{
    ArenaEvent, ArenaPrompts, ArenaResults, ArenaSpec, ChatTarget, Estimate, JudgeEvent, JudgeKey,
    JudgeScope, JudgeSpec, JudgeStats, SplitName, VerdictMode, Vote, VoteSource, WinRates,
};
use clap::{Args, Subcommand};

use super::{interrupt, SamplingArgs, Target};

#[derive(Subcommand)]
pub enum ArenaCommand {
    /// Creates an arena: candidates A and B answer the same prompts (typed in a file, one
    /// per line, or a dataset split's user turns).
    Create(Box<CreateArgs>),
    /// Every arena with its human tally.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One prompt with both answers, sides hidden as left and right (answers are
    /// generated on first view).
    Show {
        id: i64,
        /// 0-based prompt number.
        index: u64,
        #[arg(long)]
        json: bool,
    },
    /// A human vote on a prompt, about the sides as `show` printed them.
    Vote {
        id: i64,
        index: u64,
        /// left, right, tie or both-bad.
        #[arg(value_parser = parse_vote)]
        vote: Vote,
    },
    /// A judge (a model, an adapter, a template, or an endpoint's model) votes on the
    /// prompts without a human vote (all prompts with --all), against the rubric.
    Judge(Box<JudgeArgs>),
    /// Win rates of both sides with 95% Wilson intervals for the human votes, each judge's
    /// and both combined; each judge's agreement with the humans and Cohen's kappa.
    Results {
        id: i64,
        #[arg(long)]
        json: bool,
    },
    /// Each judge vote with the judge's raw verdict.
    Verdicts {
        id: i64,
        #[arg(long)]
        json: bool,
    },
    /// Shows the judging rubric, or saves a new version from a file.
    Rubric {
        /// Saves this file's text as the rubric (a new version when it changed).
        #[arg(long, value_name = "FILE")]
        set: Option<PathBuf>,
        /// Shows this earlier version.
        #[arg(long, conflicts_with = "set")]
        version: Option<u32>,
    },
    /// Removes an arena with its answers and votes (human and judge).
    Rm { id: i64 },
}

#[derive(Args)]
pub struct CreateArgs {
    /// Candidate A: a model (id or name), `adapter:NAME` or `endpoint:NAME:MODEL`.
    #[arg(long)]
    a: String,
    /// Candidate B, written as --a.
    #[arg(long)]
    b: String,
    /// A prompt template for candidate A.
    #[arg(long)]
    a_template: Option<String>,
    /// A prompt template for candidate B.
    #[arg(long)]
    b_template: Option<String>,
    /// A text file of prompts, one per line (blank lines skipped).
    #[arg(long, conflicts_with = "dataset", required_unless_present = "dataset")]
    prompts: Option<PathBuf>,
    /// A dataset's user turns as the prompts.
    #[arg(long)]
    dataset: Option<String>,
    /// The dataset split: train, valid or test.
    #[arg(long, default_value = "test", requires = "dataset")]
    split: String,
    /// Most prompts from the dataset.
    #[arg(long, requires = "dataset")]
    limit: Option<usize>,
    #[arg(long)]
    name: Option<String>,
    /// Seeds which side each candidate is shown on.
    #[arg(long = "side-seed", default_value_t = 42)]
    side_seed: u64,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct JudgeArgs {
    id: i64,
    /// The judge: a local model (id or name).
    #[arg(long, conflicts_with_all = ["judge_adapter", "endpoint"])]
    judge_model: Option<String>,
    /// The judge: an adapter on its base.
    #[arg(long, conflicts_with = "endpoint")]
    judge_adapter: Option<String>,
    /// The judge: a remote endpoint's model (with --model).
    #[arg(long, requires = "model")]
    endpoint: Option<String>,
    /// The endpoint's model id.
    #[arg(long, requires = "endpoint")]
    model: Option<String>,
    /// A prompt template in front of the judge (a model or an endpoint's model).
    #[arg(long, conflicts_with = "judge_adapter")]
    judge_template: Option<String>,
    /// The rubric's text from a file (saved as a new rubric version if it changed);
    /// default: the stored rubric (`attune arena rubric`).
    #[arg(long, value_name = "FILE")]
    rubric: Option<PathBuf>,
    /// Judge each prompt twice, answers swapped; disagreeing verdicts count as a tie.
    #[arg(long)]
    both_orders: bool,
    /// Judge every prompt, not only those without a human vote (to measure agreement).
    #[arg(long)]
    all: bool,
    /// Judge again the prompts this judge voted on before.
    #[arg(long)]
    redo: bool,
    /// The longest verdict, in tokens.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// free: the judge writes a reply read for its `Verdict:` line; constrained: no
    /// generation, each verdict (`Verdict: 1`, `2`, `tie`, `both bad`) is scored by its
    /// log-probability under the judge and the most likely taken (local judges only).
    #[arg(long, value_parser = parse_verdict_mode, default_value = "free")]
    verdict: VerdictMode,
    #[arg(long)]
    json: bool,
}

fn parse_verdict_mode(s: &str) -> Result<VerdictMode, String> {
    VerdictMode::parse(s).ok_or_else(|| format!("'{s}': expected free or constrained"))
}

fn parse_vote(s: &str) -> Result<Vote, String> {
    match s {
        "left" => Ok(Vote::Left),
        "right" => Ok(Vote::Right),
        "tie" => Ok(Vote::Tie),
        "both-bad" | "both_bad" => Ok(Vote::BothBad),
        _ => Err(format!("'{s}': expected left, right, tie or both-bad")),
    }
}

/// A candidate written as `NAME`, `model:NAME`, `adapter:NAME` or `endpoint:NAME:MODEL`,
/// with an optional template.
fn candidate(
    engine: &Engine,
    spec: &str,
    template: Option<String>,
    flag: &str,
) -> Result<ChatTarget> {
    let mut t = Target {
        model: None,
        adapter: None,
        endpoint: None,
        template,
    };
    if let Some(a) = spec.strip_prefix("adapter:") {
        t.adapter = Some(a.to_string());
    } else if let Some(rest) = spec.strip_prefix("endpoint:") {
        let Some((e, m)) = rest
            .split_once(':')
            .filter(|(e, m)| !e.is_empty() && !m.is_empty())
        else {
            bail!("{flag} '{spec}': write an endpoint's model as endpoint:NAME:MODEL");
        };
        t.endpoint = Some(e.to_string());
        t.model = Some(m.to_string());
    } else {
        let m = spec.strip_prefix("model:").unwrap_or(spec);
        if m.is_empty() {
            bail!("{flag}: name a model, adapter:NAME or endpoint:NAME:MODEL");
        }
        t.model = Some(m.to_string());
    }
    Ok(t.resolve(engine)
        .with_context(|| format!("{flag} '{spec}'"))?
        .target)
}

pub fn arena(actor: &Actor, cmd: ArenaCommand) -> Result<()> {
    let engine = actor.engine();
    match cmd {
        ArenaCommand::Create(args) => {
            let args = *args;
            let prompts = match (&args.prompts, &args.dataset) {
                (Some(path), _) => {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("--prompts {}", path.display()))?;
                    ArenaPrompts::Typed {
                        prompts: text.lines().map(str::to_string).collect(),
                    }
                }
                (None, Some(d)) => ArenaPrompts::Dataset {
                    dataset_id: engine.find_dataset(d)?.id,
                    split: SplitName::parse(&args.split).with_context(|| {
                        format!("--split '{}': expected train, valid or test", args.split)
                    })?,
                    limit: args.limit,
                },
                (None, None) => bail!("give --prompts FILE or --dataset NAME"),
            };
            let spec = ArenaSpec {
                name: args.name,
                a: candidate(engine, &args.a, args.a_template, "--a")?,
                b: candidate(engine, &args.b, args.b_template, "--b")?,
                prompts,
                params: args.sampling.params()?,
                seed: args.side_seed,
            };
            let arena = engine.create_arena(&spec)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&arena)?);
            } else {
                println!(
                    "arena {} '{}': A = {}, B = {}; {} prompts",
                    arena.id, arena.name, arena.a_label, arena.b_label, arena.prompts
                );
            }
        }
        ArenaCommand::List { json } => {
            let list = engine.list_arenas()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                eprintln!("no arenas yet: create one with `attune arena create --a M --b M2 --prompts FILE`");
            } else {
                let rows: Vec<[String; 5]> = list
                    .iter()
                    .map(|a| {
                        [
                            a.id.to_string(),
                            a.name.clone(),
                            a.prompts.to_string(),
                            a.votes.to_string(),
                            percent(a.tally.a_win_rate),
                        ]
                    })
                    .collect();
                super::print_columns(&["ID", "NAME", "PROMPTS", "VOTES", "A WINS"], &rows);
            }
        }
        ArenaCommand::Show { id, index, json } => {
            let cancel = CancelToken::new();
            let _watch = interrupt::cancel_on_ctrl_c(&cancel);
            let item = actor.call(|reply| attune_engine::Request::ArenaItem {
                arena_id: id,
                index,
                cancel: cancel.clone(),
                on_event: Box::new(|e| {
                    if let ArenaEvent::Loading { side } = e {
                        eprintln!("(loading the {side} side's model...)");
                    }
                }),
                reply,
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&item)?);
            } else {
                println!("prompt {index}: {}\n", item.prompt);
                println!("--- left ---\n{}\n", item.left.trim());
                println!("--- right ---\n{}\n", item.right.trim());
                if let Some(v) = item.vote {
                    println!("your vote: {}", vote_word(v));
                }
            }
        }
        ArenaCommand::Vote { id, index, vote } => {
            let a = engine.arena_vote(id, index, vote)?;
            println!(
                "voted {} on prompt {index} of arena {}: {} human votes",
                vote_word(vote),
                a.id,
                a.votes
            );
        }
        ArenaCommand::Judge(args) => judge(actor, *args)?,
        ArenaCommand::Results { id, json } => {
            let r = engine.arena_results(id)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print_results(&r);
            }
        }
        ArenaCommand::Verdicts { id, json } => {
            let votes = engine.arena_judge_votes(id)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&votes)?);
            } else if votes.is_empty() {
                eprintln!("no judge has voted in arena {id} yet: `attune arena judge {id} --judge-model M`");
            } else {
                for v in &votes {
                    let orders = if v.both_orders {
                        "both orders"
                    } else {
                        "one order"
                    };
                    println!(
                        "prompt {} · {} · rubric v{} · {orders} · vote {}",
                        v.index,
                        v.judge_label,
                        v.rubric_version,
                        v.vote.as_deref().unwrap_or("none")
                    );
                    let first = if v.first_a_first {
                        "A first"
                    } else {
                        "B first"
                    };
                    println!("  [{first}] {}", one_line(&v.verdict));
                    if let Some(s) = &v.verdict_swapped {
                        let second = if v.first_a_first {
                            "B first"
                        } else {
                            "A first"
                        };
                        println!("  [{second}] {}", one_line(s));
                    }
                    if let Some(e) = &v.error {
                        println!("  unparseable: {e}");
                    }
                }
            }
        }
        ArenaCommand::Rubric { set, version } => {
            let r = match (set, version) {
                (Some(path), _) => {
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("--set {}", path.display()))?;
                    engine.save_judge_rubric(&text)?
                }
                (None, Some(v)) => engine.judge_rubric_version(v)?,
                (None, None) => engine.judge_rubric()?,
            };
            let default = if r.is_default { ", the default" } else { "" };
            eprintln!(
                "rubric version {}{default} (saved {})",
                r.version, r.created_at
            );
            println!("{}", r.text);
        }
        ArenaCommand::Rm { id } => {
            engine.remove_arena(id)?;
            println!("removed arena {id}");
        }
    }
    Ok(())
}

fn judge(actor: &Actor, args: JudgeArgs) -> Result<()> {
    let engine = actor.engine();
    let target = Target {
        model: args.judge_model.or(args.model),
        adapter: args.judge_adapter,
        endpoint: args.endpoint,
        template: args.judge_template,
    };
    if target.model.is_none() && target.adapter.is_none() {
        bail!("name the judge: --judge-model M, --judge-adapter A or --endpoint NAME --model M");
    }
    let judge = target.resolve(engine)?;
    if args.max_tokens == 0 || args.max_tokens > MAX_JUDGE_TOKENS {
        bail!(
            "--max-tokens must be 1 to {MAX_JUDGE_TOKENS}, got {}",
            args.max_tokens
        );
    }
    let rubric = match &args.rubric {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("--rubric {}", path.display()))?,
        ),
        None => None,
    };
    let spec = JudgeSpec {
        arena_id: args.id,
        judge: judge.target,
        rubric,
        both_orders: args.both_orders,
        scope: if args.all {
            JudgeScope::All
        } else {
            JudgeScope::Unvoted
        },
        max_tokens: args.max_tokens,
        redo: args.redo,
        verdict: args.verdict,
    };
    let cancel = CancelToken::new();
    let _watch = interrupt::cancel_on_ctrl_c(&cancel);
    let label = judge.label.clone();
    let report = actor.judge_arena(
        spec,
        &cancel,
        Box::new(move |e| match e {
            JudgeEvent::Started {
                total,
                rubric_version,
            } => eprintln!("{label} judges {total} prompts (rubric v{rubric_version})"),
            JudgeEvent::Answering { index } => {
                eprintln!("  prompt {index}: generating both answers first")
            }
            JudgeEvent::Voted {
                index,
                vote,
                done,
                total,
            } => eprintln!(
                "  [{done}/{total}] prompt {index}: {}",
                vote.as_deref()
                    .unwrap_or("unparseable verdict (see `attune arena verdicts`)")
            ),
        }),
    )?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let orders = if report.both_orders {
            format!(
                ", both orders ({} disagreed, counted as ties)",
                report.order_disagreements
            )
        } else {
            String::new()
        };
        println!(
            "judged {} prompts ({} unparseable), skipped {}; rubric v{}{orders}",
            report.judged, report.unparsed, report.skipped, report.rubric_version
        );
    }
    Ok(())
}

fn vote_word(v: Vote) -> &'static str {
    match v {
        Vote::Left => "left",
        Vote::Right => "right",
        Vote::Tie => "tie",
        Vote::BothBad => "both-bad",
    }
}

fn one_line(s: &str) -> String {
    let s = s.trim().replace('\n', " ⏎ ");
    let short: String = s.chars().take(160).collect();
    if short.len() < s.len() {
        format!("{short}…")
    } else {
        short
    }
}

fn percent(p: Option<f64>) -> String {
    p.map_or("-".into(), |p| format!("{:.1}%", 100.0 * p))
}

fn estimate(e: &Option<Estimate>) -> String {
    match e {
        Some(e) => format!(
            "{:.1}% [{:.1}%, {:.1}%]",
            100.0 * e.value,
            100.0 * e.low,
            100.0 * e.high
        ),
        None => "-".into(),
    }
}

fn rates_line(w: &WinRates) -> String {
    let t = &w.tally;
    format!(
        "A {} · B {} (A {}, B {}, tie {}, both bad {})",
        estimate(&w.a),
        estimate(&w.b),
        t.a_wins,
        t.b_wins,
        t.ties,
        t.both_bad
    )
}

fn print_results(r: &ArenaResults) {
    let a = &r.arena;
    println!(
        "arena {} '{}': A = {}, B = {}; {} prompts",
        a.id, a.name, a.a_label, a.b_label, a.prompts
    );
    println!("win rates, 95% Wilson intervals (a tie is half a win; both bad left out):");
    println!("  human votes ({}): {}", a.votes, rates_line(&r.human));
    if r.judges.is_empty() {
        println!(
            "no judge votes yet: `attune arena judge {} --judge-model M`",
            a.id
        );
        return;
    }
    for (n, j) in r.judges.iter().enumerate() {
        let orders = if j.both_orders {
            "both orders"
        } else {
            "one order"
        };
        println!(
            "judge {}: {} (rubric v{}, {orders}, {} verdict): {} votes, {} unparseable",
            n + 1,
            j.judge_label,
            j.rubric_version,
            j.verdict.as_str(),
            j.votes,
            j.unparsed
        );
        println!("  judge votes: {}", rates_line(&j.rates));
        println!(
            "  combined ({} human + {} judge): {}",
            j.combined_human,
            j.combined_judge,
            rates_line(&j.combined)
        );
        let g = &j.agreement;
        if g.n == 0 {
            println!("  agreement: no prompt has both a human and a parsed judge vote");
        } else {
            let kappa = match (&g.kappa, g.kappa_se) {
                (Some(k), Some(se)) => {
                    format!("{:.3} [{:.3}, {:.3}] (SE {se:.3})", k.value, k.low, k.high)
                }
                _ => "undefined (every vote in one category)".into(),
            };
            println!(
                "  agreement on {} prompts: {} agreed, {}; Cohen's kappa {kappa}",
                g.n,
                g.agreed,
                estimate(&g.percent)
            );
        }
    }
    if let Some(j) = r.judges.first() {
        println!("method: {}", j.agreement.method);
    }
}

/// The judge `sel` names in arena `arena_id`: its number as `attune arena results` prints
/// them (1, 2, …) or a part of its label; None when the arena has exactly one judge.
pub fn judge_key(engine: &Engine, arena_id: i64, sel: Option<&str>) -> Result<JudgeKey> {
    let r = engine.arena_results(arena_id)?;
    let key = |j: &JudgeStats| JudgeKey {
        judge: j.judge.clone(),
        rubric_version: j.rubric_version,
        both_orders: j.both_orders,
        verdict: j.verdict,
    };
    let listing = || {
        r.judges
            .iter()
            .enumerate()
            .map(|(n, j)| {
                format!(
                    "  {}: {} (rubric v{}, {}, {} verdict)",
                    n + 1,
                    j.judge_label,
                    j.rubric_version,
                    if j.both_orders {
                        "both orders"
                    } else {
                        "one order"
                    },
                    j.verdict.as_str()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    if r.judges.is_empty() {
        bail!(
            "arena {arena_id} has no judge votes: `attune arena judge {arena_id} --judge-model M` first"
        );
    }
    let found: Vec<&JudgeStats> = match sel {
        None => r.judges.iter().collect(),
        Some(s) => match s.trim().parse::<usize>() {
            Ok(n) if (1..=r.judges.len()).contains(&n) => vec![&r.judges[n - 1]],
            Ok(n) => bail!(
                "--judge {n}: arena {arena_id} has judges 1 to {}:\n{}",
                r.judges.len(),
                listing()
            ),
            Err(_) => {
                let want = s.trim().to_lowercase();
                r.judges
                    .iter()
                    .filter(|j| j.judge_label.to_lowercase().contains(&want))
                    .collect()
            }
        },
    };
    match found.as_slice() {
        [j] => Ok(key(j)),
        [] => bail!(
            "--judge '{}': no judge of arena {arena_id} matches; its judges:\n{}",
            sel.unwrap_or_default(),
            listing()
        ),
        _ => bail!(
            "arena {arena_id} has several judges{}: name one with --judge N:\n{}",
            sel.map(|s| format!(" matching '{s}'")).unwrap_or_default(),
            listing()
        ),
    }
}

/// The vote source `--votes` (human, judge, combined) and `--judge` name.
pub fn vote_source(
    engine: &Engine,
    arena_id: i64,
    votes: &str,
    judge: Option<&str>,
) -> Result<VoteSource> {
    match votes {
        "human" => {
            if judge.is_some() {
                bail!("--judge goes with --votes judge or combined");
            }
            Ok(VoteSource::Human)
        }
        "judge" => Ok(VoteSource::Judge {
            judge: judge_key(engine, arena_id, judge)?,
        }),
        "combined" => Ok(VoteSource::Combined {
            judge: judge_key(engine, arena_id, judge)?,
        }),
        other => bail!("--votes '{other}': human, judge or combined"),
    }
}
