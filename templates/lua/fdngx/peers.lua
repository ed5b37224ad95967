-- fdngx.peers: the one parser for the balancer's peer snapshots (pure Lua: no ngx, testable with luajit).
--
-- The same text reaches the balancer two ways: the peers file fdngx writes beside the config (read once
-- by init_by_lua when nginx starts or reloads) and the admin POST of a sidecar or cron run (no reload).
-- Either way it is DATA, never Lua source: this parser validates every byte of it before anything is used,
-- and refuses the whole text on the first bad line (all or nothing).
--
--     # comments and blank lines are ignored
--     generation 1733212345678
--     upstream fleet
--     frontends 4
--     peer <name> <host> <port> <weight> <down> <capacity> <load>
--
-- generation: the pusher's monotonic number (fdngx: wall-clock ms), exactly once, before the peers; at most
-- 2^53 - 1 (the largest integer a Lua number holds exactly: a longer one would be read as another number).
-- upstream: the upstream the snapshot is for ([A-Za-z_][A-Za-z0-9_]*, up to 64, as the inventory allows), at
-- most once, before the peers: the admin location refuses a snapshot for another upstream (fdngx.admin).
-- Optional: fdngx 0.3.0 before 2026-12-07 wrote none (its pushes and peers files are taken unchecked).
-- frontends: how many frontends the pusher sends this same snapshot to (a controller's --push-to list),
-- 1..MAX_FRONTENDS, at most once, before the peers; none means 1 (a sidecar of its own, a peers file).
-- fdngx.pick counts the other frontends' requests since the push from it.
-- name: as the inventory allows ([A-Za-z0-9][A-Za-z0-9._:@-]*, up to 128). host: an IPv4 or IPv6 literal
-- (the openresty flavor sets peers by address) of a server: not an unspecified ("this host": 0.0.0.0/8,
-- ::), multicast or broadcast address, which fdngx's inventory refuses too. port 1..65535. weight 1..10000: the peer's share, which
-- already carries its capacity (see fdngx.pick). down 0|1: the sidecar's verdict. capacity 1..1000000:
-- slots (max_num_seqs or the scraped max_batch_size). load 0..1000000 with up to 3 decimals: running +
-- queued requests at the last scrape. Fields are separated by exactly one space; nothing else is accepted.
-- empty: the line that makes a snapshot with no peer valid (an empty fleet: instances register with
-- fdngx's registry later; the balancer answers 503 until a snapshot names one). Without it, no peer is
-- refused, so a body cut after its generation line can never empty the pool.

local M = {}

M.MAX_BYTES = 4 * 1024 * 1024
M.MAX_PEERS = 10000
M.MAX_LINE = 400
M.MAX_WEIGHT = 10000
M.MAX_CAPACITY = 1000000
M.MAX_LOAD = 1000000
M.MAX_FRONTENDS = 1024 -- a controller's most (fdngx.nginx.pushfile)

local tonumber, sub, find, match, format, floor = tonumber, string.sub, string.find, string.match, string.format,
    math.floor
local unpack = unpack or table.unpack -- luajit's, or Lua 5.2+'s

-- A field as it may be echoed in an error message: quoted with Lua's %q, never longer than 40 bytes.
local function shown(s)
    if #s > 40 then s = sub(s, 1, 40) .. "..." end
    return format("%q", (s:gsub("[^%w%p ]", "?")))
end

M.MAX_GENERATION = 2 ^ 53 - 1

local function integer(s, lo, hi)
    if not match(s, "^[1-9][0-9]*$") and s ~= "0" then return nil end
    -- exact in a double: 2^53 + 1 reads as 2^53, and would be answered as that other number
    if #s > 16 or (#s == 16 and s > "9007199254740991") then return nil end
    local n = tonumber(s)
    if n < lo or n > hi then return nil end
    return n
end

local function ipv4(s)
    local a, b, c, d = match(s, "^([0-9]+)%.([0-9]+)%.([0-9]+)%.([0-9]+)$")
    if not a then return false end
    for _, octet in ipairs({ a, b, c, d }) do
        if not integer(octet, 0, 255) then return false end -- no leading zeros: 010 is octal to inet_aton
    end
    return true
end

-- "a:b:c" -> its 1..4-digit hex groups as numbers, or nil; "" -> none.
local function hex_groups(side)
    local out = {}
    if side == "" then return out end
    for part in (side .. ":"):gmatch("([^:]*):") do
        if #part > 4 or not match(part, "^[0-9A-Fa-f]+$") then return nil end
        out[#out + 1] = tonumber(part, 16)
    end
    return out
end

-- An IPv6 literal -> its 8 groups as numbers, or nil.
local function ipv6(s)
    if #s < 2 or #s > 45 or not match(s, "^[0-9A-Fa-f:.]+$") then return nil end
    local quad
    if find(s, ".", 1, true) then -- a trailing embedded IPv4 stands for two groups
        local head, v4 = match(s, "^(.*:)([0-9.]+)$")
        if not head or not ipv4(v4) then return nil end
        quad, s = v4, head .. "0:0"
    end
    local groups
    local gap = find(s, "::", 1, true)
    if not gap then
        groups = hex_groups(s)
        if not groups or #groups ~= 8 then return nil end
    else
        if find(s, "::", gap + 1, true) then return nil end -- two gaps, or ":::"
        local left, right = hex_groups(sub(s, 1, gap - 1)), hex_groups(sub(s, gap + 2))
        if not left or not right or #left + #right > 7 then return nil end -- a gap stands for one group or more
        groups = left
        for _ = 1, 8 - #left - #right do groups[#groups + 1] = 0 end
        for _, g in ipairs(right) do groups[#groups + 1] = g end
    end
    if quad then
        local a, b, c, d = match(quad, "^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
        groups[7], groups[8] = tonumber(a) * 256 + tonumber(b), tonumber(c) * 256 + tonumber(d)
    end
    return groups
end

-- The address a host names, in one spelling per address (fdngx.inventory.address_key's rule: an
-- IPv4-mapped IPv6 address is its IPv4 one), so "::1" and "0:0:0:0:0:0:0:1" are one peer's address twice;
-- nil when the host is not an IPv4 or IPv6 literal. One parse both validates and names the address.
function M.address(host)
    if not find(host, ":", 1, true) then return ipv4(host) and host or nil end
    local g = ipv6(host)
    if not g then return nil end
    if g[1] == 0 and g[2] == 0 and g[3] == 0 and g[4] == 0 and g[5] == 0 and g[6] == 0xffff then
        return format("%d.%d.%d.%d", floor(g[7] / 256), g[7] % 256, floor(g[8] / 256), g[8] % 256)
    end
    return format("%x:%x:%x:%x:%x:%x:%x:%x", unpack(g))
end

-- Why an address (M.address's spelling) can be no server's, or nil: the Python side's rule
-- (fdngx.domain.valid_host refuses multicast and broadcast; an unspecified address connects to this host).
function M.not_a_server(address)
    local a = match(address, "^(%d+)%.")
    if a then
        a = tonumber(a)
        if a == 0 then return "an unspecified address" end
        if a >= 224 and a <= 239 then return "a multicast address" end
        if address == "255.255.255.255" then return "the broadcast address" end
        return nil
    end
    if address == "0:0:0:0:0:0:0:0" then return "an unspecified address" end
    if match(address, "^ff") and #match(address, "^(%x+)") == 4 then return "a multicast address" end
    return nil
end

function M.valid_host(s)
    local address = M.address(s)
    return address ~= nil and M.not_a_server(address) == nil
end

M.UPSTREAM = "^[A-Za-z_][A-Za-z0-9_]*$"

function M.valid_upstream(s)
    return #s <= 64 and match(s, M.UPSTREAM) ~= nil
end

function M.valid_name(s)
    return #s <= 128 and match(s, "^[A-Za-z0-9][A-Za-z0-9._:@-]*$") ~= nil
end

local function load_value(s)
    if #s > 12 or not (match(s, "^[0-9]+$") or match(s, "^[0-9]+%.[0-9][0-9]?[0-9]?$")) then return nil end
    local n = tonumber(s)
    if not n or n > M.MAX_LOAD then return nil end
    return n
end

-- One "peer ..." line (without the keyword) -> peer table, or nil and the reason.
local function parse_peer(rest)
    local name, host, port, weight, down, capacity, load =
        match(rest, "^([^ ]+) ([^ ]+) ([^ ]+) ([^ ]+) ([^ ]+) ([^ ]+) ([^ ]+)$")
    if not name then
        return nil, "want 'peer NAME HOST PORT WEIGHT DOWN CAPACITY LOAD' (single spaces)"
    end
    if not M.valid_name(name) then return nil, "bad name " .. shown(name) end
    local address = M.address(host)
    if not address then return nil, "bad host " .. shown(host) .. " (an IPv4 or IPv6 literal)" end
    local why = M.not_a_server(address)
    if why then return nil, "bad host " .. shown(host) .. " (" .. why .. ", no server's)" end
    local p = {
        name = name,
        host = host,
        address = address, -- one spelling per address: the duplicate check's key
        -- ngx.balancer and cosockets parse "host:port" themselves: IPv6 needs its brackets.
        addr = find(host, ":", 1, true) and ("[" .. host .. "]") or host,
        port = integer(port, 1, 65535),
        weight = integer(weight, 1, M.MAX_WEIGHT),
        capacity = integer(capacity, 1, M.MAX_CAPACITY),
        load = load_value(load),
    }
    if not p.port then return nil, "bad port " .. shown(port) .. " (1..65535)" end
    if not p.weight then return nil, "bad weight " .. shown(weight) .. " (1..10000)" end
    if down ~= "0" and down ~= "1" then return nil, "bad down " .. shown(down) .. " (0 or 1)" end
    p.down = down == "1"
    if not p.capacity then return nil, "bad capacity " .. shown(capacity) .. " (1..1000000)" end
    if not p.load then return nil, "bad load " .. shown(load) .. " (0..1000000, up to 3 decimals)" end
    return p
end

-- Why a header line (`upstream`, `frontends`: at most once, before the peers) cannot stand here, or nil.
local function misplaced(snap, kind, count)
    if snap[kind] then return "a second " .. kind .. " line" end
    if count > 0 or snap.empty then return kind .. " after the peers" end
end

-- parse(text) -> snapshot, or nil and "line N: reason". A snapshot is
--   { generation = number, upstream = name or nil, frontends = number (1 when not said),
--     peers = { peer, ... } (in text order), by_name = { [name] = peer } }
function M.parse(text)
    if type(text) ~= "string" then return nil, "no snapshot" end
    if #text > M.MAX_BYTES then return nil, "larger than " .. M.MAX_BYTES .. " bytes" end
    if find(text, "\r", 1, true) or find(text, "%z") then return nil, "carriage return or NUL byte" end
    local snap = { peers = {}, by_name = {} }
    local addrs, count, lineno = {}, 0, 0
    for line in (text .. "\n"):gmatch("([^\n]*)\n") do
        lineno = lineno + 1
        local at = "line " .. lineno .. ": "
        if #line > M.MAX_LINE then return nil, at .. "longer than " .. M.MAX_LINE .. " bytes" end
        local kind = sub(line, 1, 1) == "#" and "#" or match(line, "^([a-z]*)")
        if kind == "generation" then
            if snap.generation then return nil, at .. "a second generation line" end
            local g = sub(line, 11, 11) == " " and integer(sub(line, 12), 0, M.MAX_GENERATION)
            if not g then return nil, at .. "bad generation " .. shown(sub(line, 12)) .. " (0..2^53-1)" end
            snap.generation = g
        elseif kind == "upstream" and sub(line, 9, 9) == " " then
            local why = misplaced(snap, kind, count)
            if why then return nil, at .. why end
            local name = sub(line, 10)
            if not M.valid_upstream(name) then return nil, at .. "bad upstream " .. shown(name) end
            snap.upstream = name
        elseif kind == "frontends" and sub(line, 10, 10) == " " then
            local why = misplaced(snap, kind, count)
            if why then return nil, at .. why end
            local n = integer(sub(line, 11), 1, M.MAX_FRONTENDS)
            if not n then
                return nil, at .. "bad frontends " .. shown(sub(line, 11)) .. " (1.." .. M.MAX_FRONTENDS .. ")"
            end
            snap.frontends = n
        elseif kind == "empty" and line == "empty" then
            if not snap.generation then return nil, at .. "empty before the generation line" end
            if snap.empty then return nil, at .. "a second empty line" end
            snap.empty = true
        elseif kind == "peer" and sub(line, 5, 5) == " " then
            if not snap.generation then return nil, at .. "a peer before the generation line" end
            local p, err = parse_peer(sub(line, 6))
            if not p then return nil, at .. err end
            if snap.by_name[p.name] then return nil, at .. "duplicate peer " .. shown(p.name) end
            local key = p.address .. "|" .. p.port
            if addrs[key] then return nil, at .. "duplicate address " .. shown(p.host .. " " .. p.port) end
            count = count + 1
            if count > M.MAX_PEERS then return nil, at .. "more than " .. M.MAX_PEERS .. " peers" end
            addrs[key] = true
            snap.by_name[p.name] = p
            snap.peers[count] = p
        elseif line ~= "" and kind ~= "#" then
            return nil, at .. "unknown line " .. shown(line)
        end
    end
    if not snap.generation then return nil, "no generation line" end
    if count == 0 and not snap.empty then
        return nil, "no peers (a snapshot must list every peer, or say empty; refusing to empty the pool)"
    end
    if count > 0 and snap.empty then return nil, "peers in a snapshot that says empty" end
    snap.frontends = snap.frontends or 1
    return snap
end

-- Names in `a` missing from `b` (both snapshots or nil), sorted: what a push added or removed.
function M.missing(a, b)
    local out = {}
    if not a then return out end
    for _, p in ipairs(a.peers) do
        if not (b and b.by_name[p.name]) then out[#out + 1] = p.name end
    end
    table.sort(out)
    return out
end

return M
