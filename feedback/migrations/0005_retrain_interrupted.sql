-- A round stopped by SIGTERM / SIGINT (a deploy restarting the retraining service, an operator)
-- is recorded as 'interrupted', apart from rounds that failed: nothing was registered or
-- promoted, and the next round simply runs again.
ALTER TABLE retrain_runs DROP CONSTRAINT retrain_runs_status_check;
ALTER TABLE retrain_runs ADD CONSTRAINT retrain_runs_status_check
    CHECK (status IN ('running', 'succeeded', 'rejected', 'failed', 'skipped', 'interrupted'));
