// Room chat for the browser, riding on the y-websocket provider's own socket. No dependencies.
//
//   import { WebsocketProvider } from 'y-websocket'
//   import * as Y from 'yjs'
//   import { attachChat } from './chat.js'
//
//   const provider = new WebsocketProvider(url, room, ydoc, { params: { token } })
//   const chat = attachChat(provider)            // before the socket opens: the join history is pushed at once
//   chat.on('history', ({ messages, hasMore }) => render(messages))    // pushed on every (re)join
//   chat.on('message', (m) => append(m))         // live, from every node (your own included)
//   chat.on('updated', (m) => replace(m))        // edits and reactions
//   chat.on('deleted', (m) => tombstone(m))      // m.deleted === true, m.text === ''
//   const m = await chat.send('look @bob', { anchor: chat.anchorRange(Y, ytext, 6, 11) })
//   const older = await chat.history({ before: firstId, limit: 50 })
//   chat.setTyping(true)                         // presence field {chat: {typing: true}}; never stored
//
// Refusals reject with ChatError (err.code: 'too-long' | 'rate-limited' | 'forbidden' | 'not-found' |
// 'bad-request' | 'busy' | 'unavailable'); the connection stays open. Wire format: README "Chat".
//
// How it hooks in: the provider owns the socket, so this module installs
// provider.messageHandlers[101] (keeping any previous handler for other extension types, e.g. undo)
// and sends frames with provider.ws.send. A frame is varUint(101) · varUint8Array(UTF-8 JSON).

export const MESSAGE_EXTENSION = 101

const encoder = new TextEncoder()
const decoder = new TextDecoder()

function writeVarUint (out, value) {
  while (value > 0x7f) {
    out.push(0x80 | (value & 0x7f))
    value = Math.floor(value / 128)
  }
  out.push(value)
}

function readVarUint (bytes, pos) {
  let value = 0
  let mult = 1
  for (let i = 0; i < 8; i++) {
    if (pos >= bytes.length) throw new Error('truncated varint')
    const byte = bytes[pos++]
    value += (byte & 0x7f) * mult
    if (byte < 0x80) return [value, pos]
    mult *= 128
  }
  throw new Error('varint too long')
}

/** One extension frame (type 101) carrying the JSON object `body` (it needs a string `type`). */
export function encodeExtension (body) {
  const json = encoder.encode(JSON.stringify(body))
  const head = []
  writeVarUint(head, MESSAGE_EXTENSION)
  writeVarUint(head, json.length)
  const frame = new Uint8Array(head.length + json.length)
  frame.set(head, 0)
  frame.set(json, head.length)
  return frame
}

/** The JSON body of a whole frame, or null if it is not an extension frame. */
export function decodeExtension (frame) {
  const bytes = frame instanceof Uint8Array ? frame : new Uint8Array(frame)
  const [type, pos] = readVarUint(bytes, 0)
  if (type !== MESSAGE_EXTENSION) return null
  return readBody(bytes, pos)[0]
}

function readBody (bytes, pos) {
  const [length, start] = readVarUint(bytes, pos)
  const end = start + length
  if (end > bytes.length) throw new Error('declared length exceeds frame')
  return [JSON.parse(decoder.decode(bytes.subarray(start, end))), end]
}

export class ChatError extends Error {
  constructor (body) {
    super(`${body.code || 'error'}: ${body.message || ''}`)
    this.name = 'ChatError'
    this.code = body.code || 'error'
    this.body = body
  }
}

const PUSHES = { 'chat.message': 'message', 'chat.updated': 'updated', 'chat.deleted': 'deleted' }

/**
 * Attach chat to a y-websocket provider. Returns { send, edit, delete, react, history, markRead,
 * on, setTyping, anchorRange, detach }.
 */
export function attachChat (provider, { timeout = 10000 } = {}) {
  const listeners = new Map()
  const pending = new Map()
  let nextId = 1
  const previous = provider.messageHandlers[MESSAGE_EXTENSION]

  const emit = (event, value) => {
    for (const cb of listeners.get(event) || []) {
      try { cb(value) } catch (err) { console.error(err) }
    }
  }

  // y-websocket calls handlers as (encoder, decoder, provider, emitSynced, messageType); the
  // decoder ({arr, pos}) is positioned after the message type. We write nothing to the encoder.
  const handler = (enc, dec, ...rest) => {
    const start = dec.pos
    let body
    try {
      const [parsed, end] = readBody(dec.arr, dec.pos)
      body = parsed
      dec.pos = end
    } catch (err) {
      return
    }
    const type = body && body.type
    const ours = typeof type === 'string' && (type.startsWith('chat.') || (type === 'error' && pending.has(body.id)))
    if (!ours) {
      if (previous) {
        dec.pos = start
        previous(enc, dec, ...rest)
      }
      return
    }
    if (body.id !== undefined && body.id !== null && pending.has(body.id)) {
      const { resolve, reject, timer } = pending.get(body.id)
      pending.delete(body.id)
      clearTimeout(timer)
      if (type === 'error') reject(new ChatError(body))
      else resolve(body)
      return
    }
    if (type === 'chat.history') {
      emit('history', { messages: body.messages || [], hasMore: !!body.has_more })
    } else if (PUSHES[type]) {
      emit(PUSHES[type], body.message)
    }
  }
  provider.messageHandlers[MESSAGE_EXTENSION] = handler

  const onStatus = ({ status }) => {
    if (status === 'disconnected') {
      for (const [id, { reject, timer }] of pending) {
        clearTimeout(timer)
        reject(new ChatError({ code: 'connection-lost', message: 'the connection dropped before the reply' }))
        pending.delete(id)
      }
    }
  }
  provider.on('status', onStatus)

  const request = (body) => new Promise((resolve, reject) => {
    const ws = provider.ws
    if (!ws || !provider.wsconnected) {
      reject(new ChatError({ code: 'not-connected', message: 'not connected' }))
      return
    }
    const id = nextId++
    const timer = setTimeout(() => {
      pending.delete(id)
      reject(new ChatError({ code: 'timeout', message: 'no reply in time' }))
    }, timeout)
    pending.set(id, { resolve, reject, timer })
    ws.send(encodeExtension({ ...body, id }))
  })

  return {
    async send (text, { anchor = null, replyTo = null } = {}) {
      const body = { type: 'chat.send', text }
      if (anchor) body.anchor = anchor
      if (replyTo) body.reply_to = replyTo
      return (await request(body)).message
    },
    async edit (messageId, text) {
      return (await request({ type: 'chat.edit', message_id: messageId, text })).message
    },
    async delete (messageId) {
      return (await request({ type: 'chat.delete', message_id: messageId })).message
    },
    async react (messageId, emoji) {
      return (await request({ type: 'chat.react', message_id: messageId, emoji })).message
    },
    async history ({ limit = 50, before = null } = {}) {
      const body = { type: 'chat.history', limit }
      if (before) body.before = before
      const reply = await request(body)
      return { messages: reply.messages || [], hasMore: !!reply.has_more }
    },
    async markRead (upto) {
      return (await request({ type: 'chat.read', upto })).marked
    },
    /** 'message' | 'updated' | 'deleted' | 'history'; returns an unsubscribe function. */
    on (event, cb) {
      if (!listeners.has(event)) listeners.set(event, new Set())
      listeners.get(event).add(cb)
      return () => listeners.get(event).delete(cb)
    },
    /** Typing indicator as a presence field: ephemeral, relayed like cursors, never stored. */
    setTyping (active) {
      const awareness = provider.awareness
      if (!awareness) return
      const current = (awareness.getLocalState() || {}).chat || {}
      awareness.setLocalStateField('chat', { ...current, typing: !!active })
    },
    /** A relative-position range over ytext[start:end] that follows edits (pass your Yjs module). */
    anchorRange (Y, ytext, start, end) {
      return {
        start: Y.relativePositionToJSON(Y.createRelativePositionFromTypeIndex(ytext, start, 0)),
        end: Y.relativePositionToJSON(Y.createRelativePositionFromTypeIndex(ytext, end, -1))
      }
    },
    detach () {
      if (provider.messageHandlers[MESSAGE_EXTENSION] === handler) {
        if (previous) provider.messageHandlers[MESSAGE_EXTENSION] = previous
        else delete provider.messageHandlers[MESSAGE_EXTENSION]
      }
      provider.off('status', onStatus)
      onStatus({ status: 'disconnected' })
    }
  }
}
