//! The persistent job table (SQLite, WAL). Every state change of a job goes through here, so the
//! queue survives a restart.

use std::path::Path;
use std::sync::Mutex;

use anyhow::Context;
use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::protocol::{JobOutput, JobSettings};

/// Lifecycle status, with OpenAI's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Queued,
    InProgress,
    Completed,
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::InProgress => "in_progress",
            Status::Completed => "completed",
            Status::Failed => "failed",
        }
    }

    fn parse(s: &str) -> rusqlite::Result<Status> {
        Ok(match s {
            "queued" => Status::Queued,
            "in_progress" => Status::InProgress,
            "completed" => Status::Completed,
            "failed" => Status::Failed,
            other => {
                return Err(rusqlite::Error::InvalidColumnType(
                    0,
                    format!("status {other}"),
                    rusqlite::types::Type::Text,
                ))
            }
        })
    }

    pub fn is_finished(self) -> bool {
        matches!(self, Status::Completed | Status::Failed)
    }
}

/// One job as stored.
#[derive(Debug, Clone)]
pub struct JobRow {
    pub id: String,
    pub status: Status,
    pub progress: u32,
    pub stage: Option<String>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub expires_at: Option<i64>,
    pub settings: JobSettings,
    pub output: Option<JobOutput>,
    pub error: Option<(String, String)>,
    pub remixed_from: Option<String>,
    pub attempts: u32,
    /// The outputs were deleted by retention.
    pub expired: bool,
}

pub struct Store {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    progress INTEGER NOT NULL DEFAULT 0,
    stage TEXT,
    created_at INTEGER NOT NULL,
    started_at INTEGER,
    completed_at INTEGER,
    expires_at INTEGER,
    settings TEXT NOT NULL,
    output TEXT,
    error_code TEXT,
    error_message TEXT,
    remixed_from TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    expired INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, seq);
";

const COLUMNS: &str = "id, status, progress, stage, created_at, started_at, completed_at, \
    expires_at, settings, output, error_code, error_message, remixed_from, attempts, expired";

fn row_to_job(row: &Row<'_>) -> rusqlite::Result<JobRow> {
    let json_err = |e: serde_json::Error| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    };
    let settings: String = row.get(8)?;
    let output: Option<String> = row.get(9)?;
    let code: Option<String> = row.get(10)?;
    let message: Option<String> = row.get(11)?;
    Ok(JobRow {
        id: row.get(0)?,
        status: Status::parse(&row.get::<_, String>(1)?)?,
        progress: row.get(2)?,
        stage: row.get(3)?,
        created_at: row.get(4)?,
        started_at: row.get(5)?,
        completed_at: row.get(6)?,
        expires_at: row.get(7)?,
        settings: serde_json::from_str(&settings).map_err(json_err)?,
        output: output
            .map(|o| serde_json::from_str(&o))
            .transpose()
            .map_err(json_err)?,
        error: code.map(|c| (c, message.unwrap_or_default())),
        remixed_from: row.get(12)?,
        attempts: row.get(13)?,
        expired: row.get::<_, i64>(14)? != 0,
    })
}

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Store {
    pub fn open(path: &Path) -> anyhow::Result<Store> {
        let conn = Connection::open(path)
            .with_context(|| format!("opening database {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (each call is one statement or
        // one transaction), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Inserts a queued job unless `max_queued` jobs are already waiting (returns false then).
    pub fn insert_queued(
        &self,
        id: &str,
        settings: &JobSettings,
        remixed_from: Option<&str>,
        max_queued: usize,
    ) -> anyhow::Result<bool> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let queued: i64 = tx.query_row(
            "SELECT COUNT(*) FROM jobs WHERE status = 'queued'",
            [],
            |r| r.get(0),
        )?;
        if queued as usize >= max_queued {
            return Ok(false);
        }
        tx.execute(
            "INSERT INTO jobs (id, status, created_at, settings, remixed_from) \
             VALUES (?1, 'queued', ?2, ?3, ?4)",
            params![id, now(), serde_json::to_string(settings)?, remixed_from],
        )?;
        tx.commit()?;
        Ok(true)
    }

    pub fn get(&self, id: &str) -> anyhow::Result<Option<JobRow>> {
        let conn = self.conn();
        let sql = format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1");
        Ok(conn.query_row(&sql, [id], row_to_job).optional()?)
    }

    /// A page of jobs in creation order (`ascending`) or reverse, after the job `after`.
    /// Returns the page and whether more follow. `after` naming no job is an error (None).
    pub fn list(
        &self,
        after: Option<&str>,
        limit: usize,
        ascending: bool,
    ) -> anyhow::Result<Option<(Vec<JobRow>, bool)>> {
        let conn = self.conn();
        let after_seq: Option<i64> = match after {
            Some(id) => {
                match conn
                    .query_row("SELECT seq FROM jobs WHERE id = ?1", [id], |r| r.get(0))
                    .optional()?
                {
                    Some(seq) => Some(seq),
                    None => return Ok(None),
                }
            }
            None => None,
        };
        let (cmp, order) = if ascending {
            (">", "ASC")
        } else {
            ("<", "DESC")
        };
        let bound = after_seq.unwrap_or(if ascending { i64::MIN } else { i64::MAX });
        let sql =
            format!("SELECT {COLUMNS} FROM jobs WHERE seq {cmp} ?1 ORDER BY seq {order} LIMIT ?2");
        let mut stmt = conn.prepare(&sql)?;
        let mut rows: Vec<JobRow> = stmt
            .query_map(params![bound, (limit + 1) as i64], row_to_job)?
            .collect::<rusqlite::Result<_>>()?;
        let has_more = rows.len() > limit;
        rows.truncate(limit);
        Ok(Some((rows, has_more)))
    }

    pub fn count_by_status(&self) -> anyhow::Result<Vec<(String, i64)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT status, COUNT(*) FROM jobs GROUP BY status")?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    pub fn count_queued(&self) -> anyhow::Result<usize> {
        let conn = self.conn();
        let n: i64 = conn.query_row(
            "SELECT COUNT(*) FROM jobs WHERE status = 'queued'",
            [],
            |r| r.get(0),
        )?;
        Ok(n as usize)
    }

    /// Position (0-based) of a queued job in the queue.
    pub fn queue_position(&self, id: &str) -> anyhow::Result<Option<usize>> {
        let conn = self.conn();
        let n: Option<i64> = conn
            .query_row(
                "SELECT (SELECT COUNT(*) FROM jobs q WHERE q.status = 'queued' AND q.seq < j.seq) \
                 FROM jobs j WHERE j.id = ?1 AND j.status = 'queued'",
                [id],
                |r| r.get(0),
            )
            .optional()?;
        Ok(n.map(|n| n as usize))
    }

    /// Takes the oldest queued job and marks it running.
    pub fn claim_next(&self) -> anyhow::Result<Option<JobRow>> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let id: Option<String> = tx
            .query_row(
                "SELECT id FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()?;
        let Some(id) = id else { return Ok(None) };
        tx.execute(
            "UPDATE jobs SET status = 'in_progress', started_at = ?2, attempts = attempts + 1, \
             progress = 0, stage = NULL WHERE id = ?1",
            params![id, now()],
        )?;
        let sql = format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1");
        let row = tx.query_row(&sql, [&id], row_to_job)?;
        tx.commit()?;
        Ok(Some(row))
    }

    pub fn set_progress(&self, id: &str, progress: u32, stage: Option<&str>) -> anyhow::Result<()> {
        self.conn().execute(
            "UPDATE jobs SET progress = ?2, stage = ?3 WHERE id = ?1 AND status = 'in_progress'",
            params![id, progress, stage],
        )?;
        Ok(())
    }

    pub fn complete(&self, id: &str, output: &JobOutput, expires_at: i64) -> anyhow::Result<()> {
        self.conn().execute(
            "UPDATE jobs SET status = 'completed', progress = 100, completed_at = ?2, \
             expires_at = ?3, output = ?4 WHERE id = ?1",
            params![id, now(), expires_at, serde_json::to_string(output)?],
        )?;
        Ok(())
    }

    pub fn fail(&self, id: &str, code: &str, message: &str, expires_at: i64) -> anyhow::Result<()> {
        self.conn().execute(
            "UPDATE jobs SET status = 'failed', completed_at = ?2, expires_at = ?3, \
             error_code = ?4, error_message = ?5 WHERE id = ?1",
            params![id, now(), expires_at, code, message],
        )?;
        Ok(())
    }

    /// Fails a job only if it is still queued (atomic against a worker claiming it).
    pub fn cancel_if_queued(&self, id: &str, expires_at: i64) -> anyhow::Result<bool> {
        let n = self.conn().execute(
            "UPDATE jobs SET status = 'failed', completed_at = ?2, expires_at = ?3, \
             error_code = 'cancelled', error_message = 'cancelled before it started' \
             WHERE id = ?1 AND status = 'queued'",
            params![id, now(), expires_at],
        )?;
        Ok(n == 1)
    }

    pub fn delete(&self, id: &str) -> anyhow::Result<bool> {
        Ok(self
            .conn()
            .execute("DELETE FROM jobs WHERE id = ?1", [id])?
            == 1)
    }

    /// After a restart: jobs left `in_progress` were interrupted. Requeues those that have not
    /// been tried more than once when `requeue` is set, fails the others. Returns (requeued, failed).
    pub fn recover_interrupted(
        &self,
        requeue: bool,
        expires_at: i64,
    ) -> anyhow::Result<(usize, usize)> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let requeued = if requeue {
            tx.execute(
                "UPDATE jobs SET status = 'queued', progress = 0, stage = NULL, started_at = NULL \
                 WHERE status = 'in_progress' AND attempts < 2",
                [],
            )?
        } else {
            0
        };
        let failed = tx.execute(
            "UPDATE jobs SET status = 'failed', completed_at = ?1, expires_at = ?2, \
             error_code = 'interrupted', \
             error_message = 'the server stopped while this job was running' \
             WHERE status = 'in_progress'",
            params![now(), expires_at],
        )?;
        tx.commit()?;
        Ok((requeued, failed))
    }

    /// Finished jobs whose outputs are past `expires_at` and not yet deleted.
    pub fn expired_jobs(&self, now: i64) -> anyhow::Result<Vec<String>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id FROM jobs WHERE status IN ('completed', 'failed') AND expired = 0 \
             AND expires_at IS NOT NULL AND expires_at <= ?1",
        )?;
        let ids = stmt
            .query_map([now], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(ids)
    }

    pub fn mark_expired(&self, id: &str) -> anyhow::Result<()> {
        self.conn()
            .execute("UPDATE jobs SET expired = 1 WHERE id = ?1", [id])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::OutputFormat;
    use vidgen_engine::pipeline::GenerateRequest;

    fn settings() -> JobSettings {
        JobSettings {
            model: "demo".into(),
            request: GenerateRequest {
                prompt: "p".into(),
                ..Default::default()
            },
            output_format: OutputFormat::Mp4,
            extend_from: None,
            notes: vec![],
            memory: Default::default(),
        }
    }

    #[test]
    fn memory_knobs_survive_a_reopen_and_old_rows_load_with_defaults() {
        use crate::protocol::{MemorySettings, VaeDtype, Weights};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let store = Store::open(&path).unwrap();
        let asked = JobSettings {
            memory: MemorySettings {
                offload: Some("stream".into()),
                weights: Weights::Fp8,
                vae_dtype: VaeDtype::F32,
            },
            ..settings()
        };
        assert!(store.insert_queued("video_new", &asked, None, 8).unwrap());
        // A row written before `weights` and `vae_dtype` existed.
        store
            .conn()
            .execute(
                "INSERT INTO jobs (id, status, created_at, settings) VALUES ('video_old', \
                 'queued', 0, '{\"model\":\"demo\",\"request\":{\"prompt\":\"p\"},\
                 \"output_format\":\"webm\",\"offload\":\"cond\"}')",
                [],
            )
            .unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(store.get("video_new").unwrap().unwrap().settings, asked);
        let old = store.get("video_old").unwrap().unwrap().settings;
        assert_eq!(
            (old.memory.weights, old.memory.vae_dtype),
            (Weights::Bf16, VaeDtype::Auto)
        );
        assert_eq!(old.memory.offload.as_deref(), Some("cond"));
        // The queue hands the old row out like any other.
        assert_eq!(store.claim_next().unwrap().unwrap().id, "video_new");
        assert_eq!(store.claim_next().unwrap().unwrap().id, "video_old");
    }

    #[test]
    fn queue_order_bound_pagination_and_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.sqlite")).unwrap();
        for i in 0..3 {
            assert!(store
                .insert_queued(&format!("video_{i}"), &settings(), None, 3)
                .unwrap());
        }
        assert!(
            !store
                .insert_queued("video_x", &settings(), None, 3)
                .unwrap(),
            "bound"
        );
        assert_eq!(store.queue_position("video_2").unwrap(), Some(2));

        let (page, more) = store.list(None, 2, false).unwrap().unwrap();
        assert_eq!(
            page.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
            ["video_2", "video_1"]
        );
        assert!(more);
        let (page, more) = store.list(Some("video_1"), 2, false).unwrap().unwrap();
        assert_eq!(page.len(), 1);
        assert_eq!(page[0].id, "video_0");
        assert!(!more);
        assert!(store.list(Some("video_nope"), 2, false).unwrap().is_none());

        let claimed = store.claim_next().unwrap().unwrap();
        assert_eq!(claimed.id, "video_0");
        assert_eq!(claimed.status, Status::InProgress);
        assert!(store.cancel_if_queued("video_1", 0).unwrap());
        assert!(
            !store.cancel_if_queued("video_0", 0).unwrap(),
            "running jobs are not queued"
        );

        drop(store);
        let store = Store::open(&dir.path().join("db.sqlite")).unwrap();
        assert_eq!(store.recover_interrupted(true, 0).unwrap(), (1, 0));
        assert_eq!(
            store.get("video_0").unwrap().unwrap().status,
            Status::Queued
        );
        store.claim_next().unwrap().unwrap();
        // The second interruption of the same job fails it.
        assert_eq!(store.recover_interrupted(true, 0).unwrap(), (0, 1));
        let job = store.get("video_0").unwrap().unwrap();
        assert_eq!(job.status, Status::Failed);
        assert_eq!(job.error.unwrap().0, "interrupted");
    }
}
