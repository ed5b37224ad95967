-- fdngx.store: which snapshot is in force in the shared dict, and what a new one does to it (pure Lua: the dict
-- and the clock are passed in, so luajit tests drive it with a fake dict).
--
-- Keys (the rest of the layout: fdngx.pool):
--   gen          the generation in force
--   tie          "<gen>/<n>" while the snapshot in force is the n-th that replaced another of the same
--                generation (M.verdict's "tie"); ignored once `gen` has moved on
--   snap:<id>    the text in force, under its id (M.id): "snap:<gen>", or "snap:<gen>/<n>" after a tie
--   snap_at      when the data in force is from (a push: its install; the peers file: its generation's time)
--   put_at       when it was installed (a push or the peers file at nginx's start or reload)
--   quiet        put_at of the snapshot said to have gone quiet (M.went_quiet): said once
--   push_at      when the last push was installed; hold: the silence of the snapshot in force (M.hold)

local pick = require("fdngx.pick")

local M = {}

local format = string.format

-- A generation is the pusher's wall clock in milliseconds (fdngx.nginx.generation.next_generation). One
-- further ahead of this frontend's clock than this is refused: accepted, it would make every honest push
-- "stale" until the clock caught up with it (2^53: never; a pusher whose clock is a year ahead: a year).
-- Clocks of hosts under NTP differ by milliseconds; five minutes leave room for one that is badly set.
M.FUTURE_MS = 300000

-- A snapshot not pushed again for this long (seconds, this frontend's clock) is the word of a pusher that
-- went silent (a controller dead, cut off, or frozen): its `down` flags stop holding peers out (this
-- frontend's own /health probes decide: fdngx.health.usable), and a push of an older generation replaces it
-- (another controller, whose clock is behind the silent one's, takes over; verdict "taken"). Pushers push
-- every cycle, a new generation each time (--interval, 2 s by default): this is five cycles missed in a row.
-- It is pick.STALE_AFTER, the age at which the scraped load in a snapshot has faded to nothing: a snapshot
-- older than that no longer steers the picks by its load, nor holds a replica out by its health.
M.SILENT_AFTER = pick.STALE_AFTER

-- A pusher slower than that (a sidecar's --interval 15, a cron `render --scrape` every minute) is alive all
-- the same: its down flags would lapse, and the frontend say so twice, between every two of its pushes. So the
-- silence (the `hold` of the snapshot in force) is three of the pusher's own intervals when that is longer:
-- the time between its last two pushes here, measured at each push (a dead pusher's last one stays), at most
-- MAX_HOLD (a cron every minute: 180 s).
M.MAX_HOLD = 300

-- The silence of the snapshot in force: SILENT_AFTER, or three of its pusher's intervals (see above).
function M.hold(dict)
    return dict:get("hold") or M.SILENT_AFTER
end

-- A push installs a snapshot at `now`: its interval since the previous push sets the hold, which grows at once
-- and shrinks by half at most per push: two live pushers taking turns (two controllers, two cron hosts) make
-- the intervals alternate short and long, and a short one must not bring the hold under the long one (their
-- down flags lapsed every cycle: a review); a pusher back to its pace after one pause is at it in a few pushes.
function M.pushed(dict, now)
    local last, hold = dict:get("push_at"), M.hold(dict)
    if last and now > last then
        hold = math.min(M.MAX_HOLD, math.max(M.SILENT_AFTER, 3 * (now - last), hold / 2))
    end
    dict:safe_set("push_at", now)
    dict:safe_set("hold", hold)
end

-- The id of the snapshot in force: its generation, or "<gen>/<n>" after a tie (see the top); nil for none.
-- Every "did a push come in between" check compares ids, never generations alone.
function M.id(dict)
    local gen = dict:get("gen")
    if gen == nil then return nil end
    local tie = dict:get("tie")
    if tie and tie:match("^(%d+)/") == format("%d", gen) then return tie end
    return gen
end

function M.key(id)
    return type(id) == "string" and "snap:" .. id or format("snap:%d", id)
end

-- The id a snapshot of generation `gen` goes in under when `current` is in force: the next tie's when it
-- is of the same generation (M.verdict's "tie"), else its generation.
function M.next_id(current, gen)
    if type(current) == "number" then return current == gen and format("%d/1", gen) or gen end
    local g, n = (current or ""):match("^(%d+)/(%d+)$")
    if g and tonumber(g) == gen then return format("%s/%d", g, tonumber(n) + 1) end
    return gen
end

-- The snapshot text in force, its generation and its id, or nil (none yet). A push moving `gen` between the
-- reads deletes the old text only after `gen` moved: a second look finds the new one. An older fdngx kept
-- every generation's text under one key, `snap` (0.3.0 before 2026-12-06): after an upgrade by reload its
-- old workers still push that way until they exit, and its text is the one in force when its generation
-- line is `gen`'s (the next install here deletes it).
function M.text(dict)
    for _ = 1, 3 do
        local id = M.id(dict)
        if id == nil then return nil end
        local gen = dict:get("gen")
        local text = dict:get(M.key(id))
        if text ~= nil then return text, gen, id end
        local legacy = dict:get("snap")
        if legacy and tonumber(legacy:match("^generation (%d+)\n")) == gen then return legacy, gen, id end
    end
    return nil
end

-- What to do with a snapshot of generation `gen` when `current` (or nil) is in force, at `now` (seconds):
--   "ok"         newer: install it
--   "unchanged"  the same generation and the same bytes again (a retry)
--   "tie"        the same generation, other bytes that sort after the ones in force: install it (two pushers
--                in the same millisecond: every frontend ends up holding the same one, whatever the order the
--                two arrive in, as each keeps the bytes that sort last)
--   "stale"      older than the one in force (another controller pushed a newer one), or the same generation
--                with bytes that sort first
--   "taken"      older, but the one in force has not been pushed again for SILENT_AFTER: its pusher went silent
--                and another (whose clock is behind its) takes over: install it
--   "future"     more than FUTURE_MS ahead of this frontend's clock: refused
-- `quiet`: seconds since the snapshot in force was installed (nil: never "taken"); `order`: at the same
-- generation, how the new bytes compare with those in force (M.order; nil: the same).
-- A generation in force that is itself far ahead (pushed before this rule, read from a peers file a clock
-- ahead wrote, or accepted by a clock since set back) never blocks: any snapshot within the window replaces
-- it, a push (fdngx.admin, WARN) or the peers file at a reload (fdngx.balancer.init, WARN) alike.
function M.verdict(current, gen, now, quiet, order, hold)
    local limit = now * 1000 + M.FUTURE_MS
    if gen > limit then return "future" end
    if current == nil or current > limit or gen > current then return "ok" end
    if gen == current then
        if not order or order == 0 then return "unchanged" end
        return order > 0 and "tie" or "stale"
    end
    if quiet and quiet >= (hold or M.SILENT_AFTER) then return "taken" end
    return "stale"
end

-- How `text` compares with `in_force` (bytes): 0 the same, 1 after, -1 before.
function M.order(text, in_force)
    if in_force == nil or text == in_force then return 0 end
    return text > in_force and 1 or -1
end

-- When the data of a snapshot of generation `gen` is from, installed at `now` by a push (`pushed`: now) or
-- from the peers file (the time of its generation, which its writer took from its clock: not in the future).
function M.data_at(gen, now, pushed)
    if pushed then return now end
    return math.min(now, gen / 1000)
end

-- Whether nothing was installed for SILENT_AFTER at `now` and this is the first time anyone asks: returns
-- how long (seconds), once per snapshot over every worker (the caller holds the reaper's lock), else nil.
-- Counted from the install: a peers file of last week read at nginx's start is not "no push for a week"
-- (its down flags hold nothing from the start all the same: they are as old as its generation, snap_at).
function M.went_quiet(dict, now)
    local at = dict:get("put_at") or dict:get("snap_at")
    if at == nil or now - at < M.hold(dict) or dict:get("quiet") == at then return nil end
    dict:safe_set("quiet", at)
    return now - at
end

-- A snapshot is being installed at `now` over the one installed at `was_at`: the silence said of that one
-- (M.went_quiet) ends. Returns how long it lasted (seconds), or nil when none was said.
function M.heard(dict, now, was_at)
    local said = dict:get("quiet")
    if said == nil then return nil end
    dict:delete("quiet")
    if said ~= was_at then return nil end
    return now - said
end

return M
