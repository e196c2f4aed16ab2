// Extension messages (type 101) on the document socket: varUint(101) · varString(JSON object).
//
// One dispatcher per provider. Handlers already installed for 101 (e.g. clients/web/chat.js)
// keep working: each frame is shown to our listeners, then the decoder is rewound and handed on.

import * as encoding from 'lib0/encoding'
import * as decoding from 'lib0/decoding'

export const MSG_EXTENSION = 101

export class Extensions {
  constructor (provider) {
    this.provider = provider
    this.listeners = new Map() // type -> Set<fn(body)>
    this.pending = new Map() // id -> {resolve, reject, timer}
    this.nextId = 1
    const previous = provider.messageHandlers[MSG_EXTENSION]
    provider.messageHandlers[MSG_EXTENSION] = (encoder, decoder, prov, emitSynced, messageType) => {
      const start = decoder.pos
      let body = null
      try {
        body = JSON.parse(decoding.readVarString(decoder))
      } catch (err) {
        console.warn('bad extension frame', err)
      }
      if (body && typeof body === 'object') this._dispatch(body)
      if (previous) {
        decoder.pos = start
        previous(encoder, decoder, prov, emitSynced, messageType)
      }
    }
  }

  _dispatch (body) {
    if (body.id != null && this.pending.has(body.id)) {
      const waiter = this.pending.get(body.id)
      this.pending.delete(body.id)
      clearTimeout(waiter.timer)
      if (body.type === 'error') waiter.reject(Object.assign(new Error(body.message || body.code), { body }))
      else waiter.resolve(body)
    }
    for (const fn of this.listeners.get(body.type) || []) {
      try { fn(body) } catch (err) { console.error(err) }
    }
    for (const fn of this.listeners.get('*') || []) {
      try { fn(body) } catch (err) { console.error(err) }
    }
  }

  on (type, fn) {
    if (!this.listeners.has(type)) this.listeners.set(type, new Set())
    this.listeners.get(type).add(fn)
    return () => this.listeners.get(type).delete(fn)
  }

  get connected () {
    const ws = this.provider.ws
    return !!(this.provider.wsconnected && ws && ws.readyState === WebSocket.OPEN)
  }

  /** Send a message; false if the socket is not open (extension messages are not queued). */
  send (body) {
    if (!this.connected) return false
    const enc = encoding.createEncoder()
    encoding.writeVarUint(enc, MSG_EXTENSION)
    encoding.writeVarString(enc, JSON.stringify(body))
    this.provider.ws.send(encoding.toUint8Array(enc))
    return true
  }

  /** Send with a fresh id and wait for the reply carrying that id (or an error). */
  request (body, timeoutMs = 10000) {
    const id = this.nextId++
    return new Promise((resolve, reject) => {
      if (!this.send({ ...body, id })) {
        reject(new Error('not connected'))
        return
      }
      const timer = setTimeout(() => {
        this.pending.delete(id)
        reject(new Error('no reply'))
      }, timeoutMs)
      this.pending.set(id, { resolve, reject, timer })
    })
  }
}
