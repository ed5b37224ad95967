-- A stand-in for ngx.shared.DICT (the methods fdngx uses), with a clock tests can move.
local M = {}
M.__index = M

function M.new()
    return setmetatable({ data = {}, exp = {}, clock = 0 }, M)
end

function M:_live(key)
    local e = self.exp[key]
    if e and e <= self.clock then
        self.data[key], self.exp[key] = nil, nil
    end
    return self.data[key]
end

function M:get(key)
    return self:_live(key)
end

function M:set(key, value, exptime)
    self.data[key] = value
    self.exp[key] = (exptime and exptime > 0) and (self.clock + exptime) or nil
    return true
end

function M:add(key, value, exptime)
    if self:_live(key) ~= nil then return false, "exists" end
    return self:set(key, value, exptime)
end

-- Never evicting (this one never runs out of room; tests/lua/fulldict.lua does)
M.safe_set = function(self, ...) return self:set(...) end
M.safe_add = function(self, ...) return self:add(...) end

function M:incr(key, delta, init)
    local v = self:_live(key)
    if v == nil then
        if init == nil then return nil, "not found" end
        v = init
    end
    v = v + delta
    self.data[key] = v
    return v
end

function M:delete(key)
    self.data[key], self.exp[key] = nil, nil
end

function M:get_keys()
    local keys = {}
    for k in pairs(self.data) do
        if self:_live(k) ~= nil then keys[#keys + 1] = k end
    end
    table.sort(keys)
    return keys
end

return M
