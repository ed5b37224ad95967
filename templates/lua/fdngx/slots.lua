-- fdngx.slots: a worker's /health probe slots (pure Lua: no ngx, testable with luajit). At most `size` taken at
-- once, each given back when its probe ends or `hold` seconds after it was taken, whichever comes first. Not a
-- counter: a timer nginx drops (past lua_max_running_timers) never runs, not even as premature, and would keep
-- its slot for good; after `size` such drops the worker would never probe again.

local M = {}

local Slots = {}
Slots.__index = Slots

function M.new(size, hold)
    return setmetatable({ size = size, hold = hold, till = {} }, Slots)
end

-- Whether every slot is taken at `now` (slots past their time are given back first).
function Slots:full(now)
    local n = 0
    for key, till in pairs(self.till) do
        if till <= now then self.till[key] = nil else n = n + 1 end
    end
    return n >= self.size
end

function Slots:take(key, now)
    self.till[key] = now + self.hold
end

function Slots:give(key)
    self.till[key] = nil
end

return M
