// The chat panel, over the chat service's extension messages:
//   c->s chat.send {id, text, anchor?, reply_to?}
//   s->c chat.history {messages, has_more} (on join), chat.message, chat.updated, chat.deleted
// A message: {id, author: {id, name}, text, ts, anchor, mentions}. A message sent while a range is
// selected is anchored to it ({start, end}: Yjs relative positions; the server adds the offsets
// {from, to} it resolved) and drawn as a marker in the editor; @mentions are highlighted (yours
// more strongly).

import { $, colorFor, h, timeOf, toast } from './util.js'

const MENTION = /(@[\p{L}\p{N}_.-]+)/u

export class ChatPanel {
  constructor ({ ext, me, editor, colorOf }) {
    this.ext = ext
    this.me = me
    this.editor = editor
    this.colorOf = colorOf
    this.messages = new Map() // id -> message
    this.list = $('chat-messages')
    this.form = $('chat-form')
    this.input = $('chat-input')
    this.status = $('chat-status')
    this.available = false
    this.off = [
      ext.on('chat.history', (b) => this._history(b)),
      ext.on('chat.message', (b) => this._upsert(b.message || b)),
      ext.on('chat.updated', (b) => this._upsert(b.message || b)),
      ext.on('chat.ok', (b) => { if (b.message) this._upsert(b.message) }),
      ext.on('chat.deleted', (b) => this._delete(b.message_id ?? b.message?.id ?? b.id)),
      ext.on('error', (b) => { if (String(b.ref || '').startsWith('chat')) toast(`Chat: ${b.message || b.code}`, 'error') })
    ]
    this._submit = this._submit.bind(this)
    this.form.addEventListener('submit', this._submit)
    this.status.textContent = 'Waiting for chat history…'
    this.list.replaceChildren()
  }

  _history (body) {
    this.available = true
    this.status.textContent = body.has_more ? 'Older messages are not shown.' : ''
    this.messages.clear()
    for (const m of body.messages || []) if (!m.deleted) this.messages.set(String(m.id), m)
    this._render()
  }

  _upsert (message) {
    if (!message || message.id == null) return
    this.available = true
    this.status.textContent = ''
    if (message.deleted) this.messages.delete(String(message.id))
    else this.messages.set(String(message.id), { ...(this.messages.get(String(message.id)) || {}), ...message })
    this._render()
  }

  _delete (id) {
    if (id == null) return
    this.messages.delete(String(id))
    this._render()
  }

  showSelection (range) {
    const el = $('chat-anchor')
    if (range && range.from !== range.to) {
      const text = this.editor.view.state.sliceDoc(range.from, range.to)
      el.textContent = `Anchored to “${text.length > 40 ? text.slice(0, 40) + '…' : text}”`
      el.hidden = false
    } else {
      el.hidden = true
    }
  }

  _submit (event) {
    event.preventDefault()
    const text = this.input.value.trim()
    if (!text) return
    const body = { type: 'chat.send', id: `c${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`, text }
    const anchor = this.editor.selectionAnchor()
    if (anchor) body.anchor = anchor
    if (!this.ext.send(body)) {
      toast('Not connected: the message was not sent', 'error')
      return
    }
    this.input.value = ''
  }

  _text (message) {
    const myName = (this.me.name || '').split(/\s+/)[0].toLowerCase()
    const mentionsMe = (message.mentions || []).includes(this.me.id)
    return String(message.text || '').split(MENTION).map((part) => {
      if (!part.startsWith('@') || !MENTION.test(part)) return part
      const word = part.slice(1).toLowerCase()
      const mine = word === myName || word === String(this.me.id).toLowerCase() || (mentionsMe && myName.startsWith(word))
      return h('span', { class: 'mention' + (mine ? ' me' : '') }, part)
    })
  }

  _quote (anchor) {
    const range = this.editor.resolve(anchor.start, anchor.end)
    if (!range) return 'selection'
    const text = this.editor.view.state.sliceDoc(range.from, range.to)
    return text.length > 60 ? text.slice(0, 60) + '…' : (text || 'selection')
  }

  _render () {
    const sorted = [...this.messages.values()].sort((a, b) => (a.ts || 0) - (b.ts || 0))
    this.list.replaceChildren(...sorted.map((m) => {
      const author = m.author || {}
      const mine = author.id === this.me.id
      const anchored = m.anchor && m.anchor.start
      return h('li', { class: 'chat-message' + (mine ? ' mine' : ''), dataset: { messageId: String(m.id) } },
        h('div', { class: 'chat-head' },
          h('span', { class: 'chat-author', style: { color: this.colorOf(author) } }, author.name || 'unknown'),
          h('span', { class: 'chat-time muted' }, m.ts ? timeOf(m.ts) : '')),
        anchored
          ? h('button', { type: 'button', class: 'chat-quote', title: 'Show in the document', onclick: () => this.editor.reveal(m.anchor.start, m.anchor.end) },
            '“' + this._quote(m.anchor) + '”')
          : null,
        h('div', { class: 'chat-text' + ((m.mentions || []).includes(this.me.id) ? ' mentions-me' : '') }, this._text(m)))
    }))
    this.list.scrollTop = this.list.scrollHeight
    this.editor.setAnchors(sorted.filter((m) => m.anchor && m.anchor.start).map((m) => ({
      id: String(m.id), from: m.anchor.start, to: m.anchor.end || m.anchor.start,
      title: `${(m.author || {}).name || ''}: ${m.text || ''}`.slice(0, 200)
    })))
  }

  focusMessage (id) {
    const el = this.list.querySelector(`[data-message-id="${CSS.escape(String(id))}"]`)
    if (!el) return
    el.scrollIntoView({ block: 'nearest' })
    el.classList.add('flash')
    setTimeout(() => el.classList.remove('flash'), 1200)
  }

  destroy () {
    for (const off of this.off) off()
    this.form.removeEventListener('submit', this._submit)
    this.list.replaceChildren()
    this.editor.setAnchors([])
  }
}

export const authorColor = (author) => (author && author.id ? colorFor(author.id) : '#666666')
