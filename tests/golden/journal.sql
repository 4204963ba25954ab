-- index results_by_request on results
CREATE INDEX results_by_request ON results (request_hash) WHERE status = 'ok';
-- index results_stale on results
CREATE INDEX results_stale ON results (position) WHERE stale = 1;
-- table blocks on blocks
CREATE TABLE blocks (
    block INTEGER PRIMARY KEY, rows INTEGER NOT NULL, settled INTEGER NOT NULL,
    unknown INTEGER NOT NULL, low INTEGER NOT NULL, high INTEGER NOT NULL
);
-- table lost_attempts on lost_attempts
CREATE TABLE lost_attempts (
    generation_id TEXT PRIMARY KEY, position INTEGER NOT NULL, kind TEXT NOT NULL, cost_usd REAL,
    lost_at REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0)
);
-- table meta on meta
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
-- table replaced_answers on replaced_answers
CREATE TABLE replaced_answers (position INTEGER NOT NULL, generation_id TEXT, cost_usd REAL, paid_at REAL);
-- table results on results
CREATE TABLE results (
    position INTEGER PRIMARY KEY,
    key TEXT NOT NULL,
    completion TEXT,
    finish_reason TEXT,
    response_model TEXT,
    provider TEXT,
    generation_id TEXT,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    total_tokens INTEGER,
    reasoning_tokens INTEGER,
    cached_tokens INTEGER,
    cache_write_tokens INTEGER,
    cost_usd REAL,
    cost_source TEXT,
    response_source TEXT,
    latency_ms REAL,
    attempts INTEGER,
    status TEXT NOT NULL,
    error_type TEXT,
    error_message TEXT,
    retry_on_resume INTEGER NOT NULL,
    request_hash TEXT,
    parsed TEXT,
    stale INTEGER NOT NULL,
    digest INTEGER,
    reasoning TEXT,
    tool_calls TEXT,
    label_confidence REAL,
    embedding BLOB,
    -- Unix time: the rate `pipeline status` shows, the spend of the last 24 h.
    done_at REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0),
    settings TEXT,  -- settings.settings_hash of what was asked; meta `configs` holds each
    ident_check INTEGER  -- digests.check_of its slot, id and digest; summed in `blocks`
);
-- trigger blocks_delete on results
CREATE TRIGGER blocks_delete AFTER DELETE ON results
BEGIN UPDATE blocks SET rows = rows - 1, settled = settled - (OLD.retry_on_resume = 0),
    unknown = unknown - (OLD.ident_check IS NULL),
    low = low - COALESCE(OLD.ident_check & 2147483647, 0),
    high = high - COALESCE(OLD.ident_check >> 31, 0)
    WHERE block = OLD.position >> 16 AND OLD.position >= 0; END;
-- trigger blocks_insert on results
CREATE TRIGGER blocks_insert AFTER INSERT ON results
BEGIN INSERT INTO blocks SELECT NEW.position >> 16, 1, NEW.retry_on_resume = 0, NEW.ident_check IS NULL, COALESCE(NEW.ident_check & 2147483647, 0), COALESCE(NEW.ident_check >> 31, 0) WHERE NEW.position >= 0
    ON CONFLICT (block) DO UPDATE SET rows = rows + 1, settled = settled + excluded.settled,
    unknown = unknown + excluded.unknown, low = low + excluded.low, high = high + excluded.high; END;
-- trigger blocks_update on results
CREATE TRIGGER blocks_update AFTER UPDATE OF position, retry_on_resume, ident_check ON results
BEGIN UPDATE blocks SET rows = rows - 1, settled = settled - (OLD.retry_on_resume = 0),
    unknown = unknown - (OLD.ident_check IS NULL),
    low = low - COALESCE(OLD.ident_check & 2147483647, 0),
    high = high - COALESCE(OLD.ident_check >> 31, 0)
    WHERE block = OLD.position >> 16 AND OLD.position >= 0; INSERT INTO blocks SELECT NEW.position >> 16, 1, NEW.retry_on_resume = 0, NEW.ident_check IS NULL, COALESCE(NEW.ident_check & 2147483647, 0), COALESCE(NEW.ident_check >> 31, 0) WHERE NEW.position >= 0
    ON CONFLICT (block) DO UPDATE SET rows = rows + 1, settled = settled + excluded.settled,
    unknown = unknown + excluded.unknown, low = low + excluded.low, high = high + excluded.high; END;
-- trigger keep_replaced_spend on results
CREATE TRIGGER keep_replaced_spend BEFORE DELETE ON results
    WHEN OLD.response_source = 'api' AND (OLD.cost_usd > 0 OR (OLD.status = 'ok' AND OLD.cost_usd IS NULL))
BEGIN
    INSERT INTO replaced_answers VALUES (OLD.position, OLD.generation_id, OLD.cost_usd, OLD.done_at);
END;
-- meta keys: config, configs, digests, format, hash_seed, input, transport, version
-- meta format: 3
-- meta config sections: prompt, request
-- meta config.prompt keys: column, template, messages_column, system, model_column, param_columns, images, files
-- meta config.request keys: model, temperature, top_p, max_tokens, seed, stop, response_format, provider, models, n, labels, response_schema, reasoning, fallback_models, extra, simulate, tools, tool_choice, logprobs, top_logprobs, endpoint, dimensions, openrouter_fields
-- meta input file keys: file, bytes, sha256
