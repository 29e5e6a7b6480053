-- ablate results store: the SQL views (schema revision 0001).
--
-- The migration creates exactly these statements (ablate/store/views.py holds
-- the same text; a test keeps the two identical). They run unchanged on SQLite
-- and PostgreSQL, so the same queries work from sqlite3, psql or pandas:
--
--   sqlite3 ablate.db 'select job, variant, seed, "AP", "AP50" from trial_results'
--   psql postgresql://postgres@127.0.0.1/ablate -c 'select * from variant_summary'
--   pandas.read_sql('select * from metric_curves where name = ''eval/AP''', engine)
--   ablate query 'select variant, avg("AP") from trial_results group by variant'
--
-- The COCO columns keep their usual spelling (AP, AP50, APs, AR100, ...). SQLite
-- matches column names in any case; PostgreSQL needs them double-quoted: "AP".
--
-- Metric values that were not finite (a diverged loss: NaN, +inf, -inf) are
-- stored as value NULL with is_nan TRUE, the same on both databases.
--
-- A trial whose state is 'reused' did not train: its hash matched a finished
-- trial (of any job), whose id is in trials.reused_from. The views read a
-- reused trial's metrics from that source trial, so the reused numbers show
-- under the new job, variant and seed.

-- trial_results: one row per trial, with the final value of each of the
-- twelve COCO numbers: the value of metric 'eval/<X>' at the largest step
-- the trial (or its reuse source) has for that name; NULL when it has none.
CREATE VIEW trial_results AS
SELECT
    j.name AS job,
    v.name AS variant,
    t.seed AS seed,
    t.id AS trial_id,
    t.hash AS hash,
    t.state AS state,
    t.attempts AS attempts,
    t.epoch AS epoch,
    t.wall_seconds AS wall_seconds,
    t.mlflow_run_id AS mlflow_run_id,
    t.reused_from AS reused_from,
    f."AP" AS "AP",
    f."AP50" AS "AP50",
    f."AP75" AS "AP75",
    f."APs" AS "APs",
    f."APm" AS "APm",
    f."APl" AS "APl",
    f."AR1" AS "AR1",
    f."AR10" AS "AR10",
    f."AR100" AS "AR100",
    f."ARs" AS "ARs",
    f."ARm" AS "ARm",
    f."ARl" AS "ARl"
FROM trials t
JOIN jobs j ON j.id = t.job_id
JOIN variants v ON v.id = t.variant_id
LEFT JOIN (
    SELECT
        m.trial_id AS trial_id,
        MAX(CASE WHEN m.name = 'eval/AP' THEN m.value END) AS "AP",
        MAX(CASE WHEN m.name = 'eval/AP50' THEN m.value END) AS "AP50",
        MAX(CASE WHEN m.name = 'eval/AP75' THEN m.value END) AS "AP75",
        MAX(CASE WHEN m.name = 'eval/APs' THEN m.value END) AS "APs",
        MAX(CASE WHEN m.name = 'eval/APm' THEN m.value END) AS "APm",
        MAX(CASE WHEN m.name = 'eval/APl' THEN m.value END) AS "APl",
        MAX(CASE WHEN m.name = 'eval/AR1' THEN m.value END) AS "AR1",
        MAX(CASE WHEN m.name = 'eval/AR10' THEN m.value END) AS "AR10",
        MAX(CASE WHEN m.name = 'eval/AR100' THEN m.value END) AS "AR100",
        MAX(CASE WHEN m.name = 'eval/ARs' THEN m.value END) AS "ARs",
        MAX(CASE WHEN m.name = 'eval/ARm' THEN m.value END) AS "ARm",
        MAX(CASE WHEN m.name = 'eval/ARl' THEN m.value END) AS "ARl"
    FROM metrics m
    JOIN (
        SELECT trial_id, name, MAX(step) AS step
        FROM metrics
        WHERE name IN ('eval/AP', 'eval/AP50', 'eval/AP75', 'eval/APs', 'eval/APm', 'eval/APl',
                       'eval/AR1', 'eval/AR10', 'eval/AR100', 'eval/ARs', 'eval/ARm', 'eval/ARl')
        GROUP BY trial_id, name
    ) final_step ON final_step.trial_id = m.trial_id AND final_step.name = m.name
        AND final_step.step = m.step
    GROUP BY m.trial_id
) f ON f.trial_id = CASE WHEN t.state = 'reused' AND t.reused_from IS NOT NULL
                         THEN t.reused_from ELSE t.id END;

-- metric_curves: every recorded point of every curve, one row per
-- (trial, name, step): loss terms ('loss/box', ...) per logged step (every train.log_every steps),
-- 'lr', and the evaluations ('eval/AP', ...). value is NULL where is_nan.
CREATE VIEW metric_curves AS
SELECT
    j.name AS job,
    v.name AS variant,
    t.seed AS seed,
    t.id AS trial_id,
    m.name AS name,
    m.step AS step,
    m.epoch AS epoch,
    m.value AS value,
    m.is_nan AS is_nan
FROM trials t
JOIN jobs j ON j.id = t.job_id
JOIN variants v ON v.id = t.variant_id
JOIN metrics m ON m.trial_id = CASE WHEN t.state = 'reused' AND t.reused_from IS NOT NULL
                                    THEN t.reused_from ELSE t.id END;

-- variant_summary: per job and variant, how many trials there are, how many
-- have final numbers (state 'finished' or 'reused'), and the mean final AP
-- and AP50 over those (no spread here: SQLite has no stddev; `ablate
-- results` gives mean and confidence interval across seeds).
CREATE VIEW variant_summary AS
SELECT
    job,
    variant,
    COUNT(*) AS n_trials,
    SUM(CASE WHEN state IN ('finished', 'reused') THEN 1 ELSE 0 END) AS n_finished,
    AVG(CASE WHEN state IN ('finished', 'reused') THEN "AP" END) AS "AP_mean",
    AVG(CASE WHEN state IN ('finished', 'reused') THEN "AP50" END) AS "AP50_mean"
FROM trial_results
GROUP BY job, variant;
