// Drives many stock Yjs clients (yjs + y-websocket) from one Node process.
//
// Protocol: one JSON object per line.
//   stdin  request : {"id": 1, "cmd": "insert", "client": "a", ...args}
//   stdout response: {"id": 1, "ok": true, "result": ...} | {"id": 1, "ok": false, "error": "..."}
//   stdout event   : {"event": "status"|"sync"|"connection-close"|"closed"|"connection-error"|
//                     "permission-denied"|"driver-error", "client": "a", "t": <ms epoch>, ...}
// Requests are handled concurrently (a long `type_burst` does not block others).
// Library logging (console.log/warn/error) goes to stderr so stdout stays pure JSON lines.

import * as readline from 'node:readline'
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import * as awarenessProtocol from 'y-protocols/awareness'
import * as authProtocol from 'y-protocols/auth'
import * as decoding from 'lib0/decoding'
import WebSocket from 'ws'

console.log = console.error
console.info = console.error
// every provider adds a process 'exit' listener
process.setMaxListeners(0)

const MESSAGE_AUTH = 2
const BURST_ALPHABET = 'abcdefghijklmnopqrstuvwxyz'

/** @type {Map<string, {doc: Y.Doc, provider: WebsocketProvider, closes: Array<object>}>} */
const clients = new Map()

const write = (obj) => {
  process.stdout.write(JSON.stringify(obj) + '\n')
}

const emit = (event, client, fields = {}) => {
  write({ event, client, t: Date.now(), ...fields })
}

class CommandError extends Error {}

const need = (args, key) => {
  if (args[key] === undefined) throw new CommandError(`missing argument '${key}'`)
  return args[key]
}

const getClient = (args) => {
  const name = need(args, 'client')
  const c = clients.get(name)
  if (c === undefined) throw new CommandError(`unknown client '${name}'`)
  return c
}

const sleep = (ms) => new Promise(resolve => setTimeout(resolve, ms))

const waitSynced = (c, timeoutMs) => new Promise((resolve, reject) => {
  if (c.provider.synced) return resolve(true)
  let timer = null
  const done = (fn, value) => {
    clearTimeout(timer)
    c.provider.off('sync', onSync)
    c.provider.off('closed', onClosed)
    fn(value)
  }
  const onSync = (state) => { if (state) done(resolve, true) }
  const onClosed = (ev) => done(reject, new CommandError(
    `connection closed permanently (code ${ev.code}, reason ${JSON.stringify(ev.reason)})`))
  timer = setTimeout(() => done(reject, new CommandError(`not synced after ${timeoutMs} ms`)), timeoutMs)
  c.provider.on('sync', onSync)
  c.provider.on('closed', onClosed)
})

const open = (args) => {
  const name = need(args, 'client')
  if (clients.has(name)) throw new CommandError(`client '${name}' already exists`)
  const doc = new Y.Doc()
  const awareness = new awarenessProtocol.Awareness(doc)
  if (args.awareness !== undefined) awareness.setLocalState(args.awareness)
  const provider = new WebsocketProvider(need(args, 'url'), need(args, 'room'), doc, {
    WebSocketPolyfill: WebSocket,
    params: args.params ?? {},
    connect: false,
    awareness,
    disableBc: true
  })
  const c = { doc, provider, closes: [] }
  clients.set(name, c)
  provider.on('status', ({ status }) => emit('status', name, { status }))
  provider.on('sync', (synced) => emit('sync', name, { synced }))
  provider.on('connection-close', (event) => {
    // event is null when the client closed the socket itself (disconnect(), 30 s watchdog)
    const close = event == null
      ? { code: null, reason: null, local: true }
      : { code: event.code, reason: String(event.reason ?? ''), local: false }
    c.closes.push(close)
    emit('connection-close', name, close)
  })
  provider.on('closed', ({ code, reason }) => emit('closed', name, { code, reason }))
  provider.on('connection-error', (event) =>
    emit('connection-error', name, { message: String(event?.message ?? event?.error ?? 'error') }))
  provider.messageHandlers[MESSAGE_AUTH] = (_encoder, decoder, prov) => {
    authProtocol.readAuthMessage(decoder, prov.doc, (_doc, reason) => {
      console.warn(`[${name}] permission denied: ${reason}`)
      emit('permission-denied', name, { reason })
    })
  }
  if (args.connect ?? true) provider.connect()
  return { client_id: doc.clientID, url: provider.url }
}

const destroy = (c, name) => {
  c.provider.destroy()
  c.provider.awareness.destroy()
  c.doc.destroy()
  clients.delete(name)
}

const typeBurst = async (c, args) => {
  const n = need(args, 'n')
  const interval = args.interval_ms ?? 10
  const alphabet = args.alphabet || BURST_ALPHABET
  const ytext = c.doc.getText(args.name ?? 'text')
  const start = Date.now()
  let typed = ''
  for (let i = 0; i < n; i++) {
    const delay = start + i * interval - Date.now()
    if (delay > 0) await sleep(delay)
    const ch = alphabet[i % alphabet.length]
    ytext.insert(ytext.length, ch)
    typed += ch
  }
  return { typed, elapsed_ms: Date.now() - start }
}

const fromB64 = (s) => new Uint8Array(Buffer.from(s, 'base64'))
const toB64 = (u8) => Buffer.from(u8).toString('base64')

const commands = {
  ping: () => 'pong',
  clients: () => Array.from(clients.keys()),
  open,
  wait_synced: (args) => waitSynced(getClient(args), args.timeout_ms ?? 10000),
  insert: (args) => {
    const t = getClient(args).doc.getText(args.name ?? 'text')
    t.insert(args.index ?? t.length, need(args, 'text'))
    return t.length
  },
  delete: (args) => {
    const t = getClient(args).doc.getText(args.name ?? 'text')
    t.delete(need(args, 'index'), need(args, 'length'))
    return t.length
  },
  text: (args) => getClient(args).doc.getText(args.name ?? 'text').toString(),
  map_set: (args) => {
    getClient(args).doc.getMap(args.name ?? 'map').set(need(args, 'key'), need(args, 'value'))
    return null
  },
  map_get: (args) => {
    const m = getClient(args).doc.getMap(args.name ?? 'map')
    if (args.key === undefined) return m.toJSON()
    const v = m.get(args.key)
    return v === undefined ? null : (v instanceof Y.AbstractType ? v.toJSON() : v)
  },
  set_awareness: (args) => {
    getClient(args).provider.awareness.setLocalState(need(args, 'state'))
    return null
  },
  // The y-codemirror convention: state.cursor = {anchor, head} as Yjs RelativePositions.
  set_cursor: (args) => {
    const c = getClient(args)
    const ytext = c.doc.getText(args.name ?? 'text')
    c.provider.awareness.setLocalStateField('cursor', {
      anchor: Y.createRelativePositionFromTypeIndex(ytext, need(args, 'anchor')),
      head: Y.createRelativePositionFromTypeIndex(ytext, need(args, 'head'))
    })
    return null
  },
  awareness: (args) => Object.fromEntries(
    Array.from(getClient(args).provider.awareness.getStates(), ([id, state]) => [String(id), state])),
  client_id: (args) => getClient(args).doc.clientID,
  state_vector: (args) => toB64(Y.encodeStateVector(getClient(args).doc)),
  update: (args) => toB64(Y.encodeStateAsUpdate(getClient(args).doc)),
  apply_update: (args) => {
    Y.applyUpdate(getClient(args).doc, fromB64(need(args, 'update_b64')), 'driver')
    return null
  },
  set_params: (args) => {
    getClient(args).provider.params = need(args, 'params')
    return null
  },
  disconnect: (args) => { getClient(args).provider.disconnect(); return null },
  connect: (args) => { getClient(args).provider.connect(); return null },
  destroy: (args) => { destroy(getClient(args), args.client); return null },
  status: (args) => {
    const c = getClient(args)
    return {
      connected: c.provider.wsconnected,
      connecting: c.provider.wsconnecting,
      synced: c.provider.synced,
      should_connect: c.provider.shouldConnect,
      url: c.provider.url,
      closes: c.closes
    }
  },
  type_burst: (args) => typeBurst(getClient(args), args)
}

const handle = async (line) => {
  let req
  try {
    req = JSON.parse(line)
  } catch (e) {
    return write({ id: null, ok: false, error: `bad JSON: ${e.message}` })
  }
  if (req === null || typeof req !== 'object' || Array.isArray(req)) {
    return write({ id: null, ok: false, error: 'request must be a JSON object' })
  }
  const { id = null, cmd } = req
  const fn = Object.hasOwn(commands, cmd) ? commands[cmd] : undefined
  if (fn === undefined) return write({ id, ok: false, error: `unknown command '${cmd}'` })
  try {
    const result = await fn(req)
    write({ id, ok: true, result: result === undefined ? null : result })
  } catch (e) {
    if (!(e instanceof CommandError)) console.error(e)
    write({ id, ok: false, error: e instanceof CommandError ? e.message : String(e?.stack ?? e) })
  }
}

process.on('uncaughtException', (e) => {
  console.error('uncaught exception', e)
  emit('driver-error', null, { message: String(e?.message ?? e) })
})
process.on('unhandledRejection', (e) => {
  console.error('unhandled rejection', e)
  emit('driver-error', null, { message: String(e?.message ?? e) })
})

const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity })
rl.on('line', (line) => { if (line.trim() !== '') handle(line) })
rl.on('close', () => {
  for (const [name, c] of Array.from(clients)) {
    try { destroy(c, name) } catch (e) { console.error(e) }
  }
  // let the close frames / awareness removals flush, then leave
  setTimeout(() => process.exit(0), 100).unref()
})
write({ event: 'ready', client: null, t: Date.now(), pid: process.pid })
